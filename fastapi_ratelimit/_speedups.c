/* fastapi_ratelimit._speedups: the per-request hot path of the memory backend and of the
 * response headers, in C.
 *
 * Why C: on the memory backend the limiter's own work is pure Python bytecode, about 40
 * machine instructions each, and three levels of sliding-window counting plus the headers
 * took ~200 bytecodes a level. These functions do the same arithmetic, operation for
 * operation, on C doubles and 64-bit integers.
 *
 * Every function here has a pure-Python twin that stays the reference (and is used when this
 * module is not built, or when FASTAPI_RATELIMIT_PURE=1): admit_sc is
 * `MemoryBackend._admit_all_py`, rate_limit_headers is `headers.rate_limit_headers_py`, Sender
 * is `middleware._Responder.send`, and lane_admit (with Lane and its awaitable, LaneRun) is the
 * middleware's own Python path for a request it has seen before (see `middleware._Lane`).
 * Tests hold each pair to the same answers. Where a value falls outside what C can mirror
 * exactly (an integer past 2**53, a state of an unexpected shape, a plain-string header
 * style), these functions answer "don't know" (None) before changing anything, and the
 * Python path decides.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <structmember.h>

/* Integers up to 2**53 convert to double exactly, so C's double arithmetic then matches
 * Python's int/float arithmetic bit for bit (both round correctly once per operation). */
#define EXACT_LIMIT (9007199254740992LL)
#define MAX_LEVELS 16

static PyObject *SC_ALGORITHM = NULL;   /* Algorithm.SLIDING_WINDOW_COUNTER */
static PyTypeObject *DECISION = NULL;   /* decision.Decision (a tuple subclass) */
static PyTypeObject *VERDICT = NULL;    /* decision.Verdict (a tuple subclass) */
static PyObject *FLOAT_ZERO = NULL;     /* 0.0, every admitted Decision's retry_after */

static PyObject *s_algorithm, *s_bucket, *s_code, *s_rate, *s_period_us, *s_limit, *s_name,
    *s_window, *s_move_to_end;

/* A Python int as a C integer within +-2**53; 0 with no exception set when it is not one
 * (wrong type or too large), -1 with an exception only for real errors. */
static int
exact_int(PyObject *value, long long *out)
{
    if (!PyLong_CheckExact(value)) {
        return 0;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow || v > EXACT_LIMIT || v < -EXACT_LIMIT) {
        return 0;
    }
    *out = v;
    return 1;
}

/* getattr(obj, name) as an exact int; same return convention as exact_int. */
static int
int_attr(PyObject *obj, PyObject *name, long long *out)
{
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL) {
        return -1;
    }
    int ok = exact_int(value, out);
    Py_DECREF(value);
    return ok;
}

static PyObject *
configure(PyObject *module, PyObject *args)
{
    PyObject *algorithm, *decision, *verdict;
    if (!PyArg_ParseTuple(args, "OO!O!", &algorithm, &PyType_Type, &decision, &PyType_Type,
                          &verdict)) {
        return NULL;
    }
    if (!PyType_IsSubtype((PyTypeObject *)decision, &PyTuple_Type) ||
        !PyType_IsSubtype((PyTypeObject *)verdict, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "Decision and Verdict must be tuple subclasses");
        return NULL;
    }
    Py_INCREF(algorithm);
    Py_XSETREF(SC_ALGORITHM, algorithm);
    Py_INCREF(decision);
    Py_XSETREF(DECISION, (PyTypeObject *)decision);
    Py_INCREF(verdict);
    Py_XSETREF(VERDICT, (PyTypeObject *)verdict);
    Py_RETURN_NONE;
}

/* A tuple subclass instance from `n` new references (stolen, also on failure). */
static PyObject *
new_tuple_of(PyTypeObject *type, Py_ssize_t n, PyObject **items)
{
    PyObject *result = type->tp_alloc(type, n);
    if (result == NULL) {
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_XDECREF(items[i]);
        }
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (items[i] == NULL) {
            /* A failed allocation upstream: drop the rest and fail. */
            for (Py_ssize_t j = i + 1; j < n; j++) {
                Py_XDECREF(items[j]);
            }
            Py_DECREF(result);
            return NULL;
        }
        PyTuple_SET_ITEM(result, i, items[i]);
    }
    return result;
}

/* One level to decide: what the sliding window counter needs, with the storage key. */
typedef struct {
    PyObject *key;          /* new reference */
    PyObject *scope;        /* borrowed */
    PyObject *policy_limit; /* new reference: Decision.limit */
    PyObject *name;         /* new reference: Decision.policy */
    PyObject *window_s;     /* new reference: Decision.window */
    long long limit, period, cost;
    /* Filled in by admit_levels. */
    PyObject *entry;        /* new reference (from the dict), may be NULL */
    long long start, cur, prev, reset_us;
    double available;
    /* The stored state's own int objects for start and prev, when the new state keeps those
     * values (borrowed from the held entry's state; NULL: make new ones). */
    PyObject *start_obj, *prev_obj;
} Level;

static void
release_levels(Level *levels, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_CLEAR(levels[i].key);
        Py_CLEAR(levels[i].policy_limit);
        Py_CLEAR(levels[i].name);
        Py_CLEAR(levels[i].window_s);
        Py_CLEAR(levels[i].entry);
    }
}

/* A stored state (start, current, previous) for a level, from its new values: the old tuple
 * itself, rewritten, where nothing else can see it (only its entry holds it: a tuple no one
 * else references is unobservable, and CPython's own zip() reuses tuples the same way), else
 * a new one. Returns a new reference, or NULL with an exception. */
static PyObject *
next_state(Level *level, PyObject *old)
{
    /* Ints are immutable: the old state's objects serve the new state as well (the caller
     * holds the old state until the new one is in place). */
    PyObject *fields[3] = {
        level->start_obj != NULL ? Py_NewRef(level->start_obj) : PyLong_FromLongLong(level->start),
        PyLong_FromLongLong(level->cur + level->cost),
        level->prev_obj != NULL ? Py_NewRef(level->prev_obj) : PyLong_FromLongLong(level->prev),
    };
    if (old != NULL && PyTuple_CheckExact(old) && Py_REFCNT(old) == 1 &&
        PyTuple_GET_SIZE(old) == 3 && fields[0] != NULL && fields[1] != NULL &&
        fields[2] != NULL) {
        PyObject *previous[3];
        for (int i = 0; i < 3; i++) {
            previous[i] = PyTuple_GET_ITEM(old, i);
            PyTuple_SET_ITEM(old, i, fields[i]);
        }
        for (int i = 0; i < 3; i++) {
            Py_DECREF(previous[i]); /* ints: freeing them runs no Python code */
        }
        return Py_NewRef(old);
    }
    return new_tuple_of(&PyTuple_Type, 3, fields);
}

/* MemoryBackend._admit_all_py's arithmetic and commit for `n` filled levels. Returns a new
 * Verdict (or, with `as_list`, just its decisions as a new list), Py_None (a new reference)
 * for "don't know" before anything changed, or NULL with an exception. New entries are
 * appended to `fresh` as (key, [expires, state]). `move` is data.move_to_end, bound, or NULL
 * to look it up; `keys_distinct`: the caller knows no two levels share a key. */
static PyObject *
admit_levels(Level *levels, Py_ssize_t n, long long now, PyObject *data, long long margin,
             PyObject *fresh, PyObject *move, int as_list, int keys_distinct)
{
    int ok;
    long long window = 0, start = 0, elapsed = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Level *level = &levels[i];
        if (level->period <= 0) {
            Py_RETURN_NONE;
        }
        if (level->period != window) { /* levels mostly share a window: its math once */
            window = level->period;
            start = (long long)floor((double)now / (double)window) * window;
            elapsed = now - start;
        }
        /* The stored state, when live and of the expected shape. */
        PyObject *entry = PyDict_GetItemWithError(data, level->key);
        long long cur = 0, prev = 0;
        if (entry == NULL && PyErr_Occurred()) {
            return NULL;
        }
        if (entry != NULL) {
            long long expires;
            if (!PyList_CheckExact(entry) || PyList_GET_SIZE(entry) != 2) {
                Py_RETURN_NONE;
            }
            if ((ok = exact_int(PyList_GET_ITEM(entry, 0), &expires)) <= 0) {
                return ok < 0 ? NULL : Py_NewRef(Py_None);
            }
            if (expires > now) {
                PyObject *state = PyList_GET_ITEM(entry, 1);
                long long s0, s1, s2;
                if (!PyTuple_CheckExact(state) || PyTuple_GET_SIZE(state) != 3) {
                    Py_RETURN_NONE;
                }
                if ((ok = exact_int(PyTuple_GET_ITEM(state, 0), &s0)) <= 0 ||
                    (ok = exact_int(PyTuple_GET_ITEM(state, 1), &s1)) <= 0 ||
                    (ok = exact_int(PyTuple_GET_ITEM(state, 2), &s2)) <= 0) {
                    return ok < 0 ? NULL : Py_NewRef(Py_None);
                }
                if (s0 == start) {
                    cur = s1;
                    prev = s2;
                    level->start_obj = PyTuple_GET_ITEM(state, 0);
                    level->prev_obj = PyTuple_GET_ITEM(state, 2);
                }
                else if (s0 == start - window) {
                    prev = s1;
                    level->prev_obj = PyTuple_GET_ITEM(state, 1);
                }
            }
        }
        /* Python: limit - (prev * ((window - elapsed) / window) + cur), every operand exact. */
        double available =
            (double)level->limit -
            ((double)prev * ((double)(window - elapsed) / (double)window) + (double)cur);
        if (!((double)level->cost <= available) || cur + level->cost > EXACT_LIMIT) {
            Py_RETURN_NONE; /* a refusal (or a count C can't hold): the general path */
        }
        level->entry = Py_XNewRef(entry); /* held: commit calls into Python-visible code */
        level->start = start;
        level->cur = cur;
        level->prev = prev;
        level->reset_us = 2 * window - elapsed;
        level->available = available;
    }
    /* The same key twice: the general path raises the error for it (lanes checked theirs
     * when made). */
    for (Py_ssize_t i = 1; i < n && !keys_distinct; i++) {
        for (Py_ssize_t j = 0; j < i; j++) {
            int same = PyObject_RichCompareBool(levels[i].key, levels[j].key, Py_EQ);
            if (same < 0) {
                return NULL;
            }
            if (same) {
                Py_RETURN_NONE;
            }
        }
    }
    /* Commit: nothing below answers "don't know" any more. */
    PyObject *decisions = as_list ? PyList_New(n) : PyTuple_New(n);
    if (decisions == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Level *level = &levels[i];
        PyObject *expires = PyLong_FromLongLong(now + level->reset_us + margin);
        if (expires == NULL) {
            Py_DECREF(decisions);
            return NULL;
        }
        if (level->entry != NULL) {
            /* Live or expired, the entry is this key's: update it and move it to the recent
             * end, as a new one would be. PyList_SetItem steals both references. */
            if (PyList_GET_SIZE(level->entry) != 2) {
                /* Changed under us (only a finalizer run by the collector could): refuse
                 * rather than write past its end. */
                Py_DECREF(expires);
                Py_DECREF(decisions);
                PyErr_SetString(PyExc_RuntimeError, "a rate-limit entry changed shape");
                return NULL;
            }
            PyObject *old = PyList_GET_ITEM(level->entry, 1);
            Py_INCREF(old);
            PyList_SetItem(level->entry, 0, expires);
            /* The entry's own reference goes first, so an unshared state can be rewritten. */
            PyList_SET_ITEM(level->entry, 1, Py_NewRef(Py_None));
            Py_DECREF(old);
            PyObject *state = next_state(level, Py_REFCNT(old) == 1 ? old : NULL);
            if (state == NULL) {
                PyList_SetItem(level->entry, 1, old); /* unchanged: back where it was */
                Py_DECREF(decisions);
                return NULL;
            }
            PyList_SetItem(level->entry, 1, state);
            Py_DECREF(old);
            PyObject *moved = move != NULL
                                  ? PyObject_CallOneArg(move, level->key)
                                  : PyObject_CallMethodOneArg(data, s_move_to_end, level->key);
            if (moved == NULL) {
                Py_DECREF(decisions);
                return NULL;
            }
            Py_DECREF(moved);
        }
        else {
            PyObject *state = next_state(level, NULL);
            PyObject *entry = state != NULL ? PyList_New(2) : NULL;
            if (entry == NULL) {
                Py_DECREF(expires);
                Py_XDECREF(state);
                Py_DECREF(decisions);
                return NULL;
            }
            PyList_SET_ITEM(entry, 0, expires);
            PyList_SET_ITEM(entry, 1, state);
            PyObject *pair = PyTuple_Pack(2, level->key, entry);
            Py_DECREF(entry);
            if (pair == NULL || PyList_Append(fresh, pair) < 0) {
                Py_XDECREF(pair);
                Py_DECREF(decisions);
                return NULL;
            }
            Py_DECREF(pair);
        }
        long long remaining = (long long)floor(level->available - (double)level->cost);
        PyObject *dfields[8] = {
            Py_NewRef(Py_True),
            Py_NewRef(level->policy_limit),
            PyLong_FromLongLong(remaining > 0 ? remaining : 0),
            PyFloat_FromDouble((double)level->reset_us / 1000000.0),
            Py_NewRef(FLOAT_ZERO),
            Py_NewRef(level->name),
            Py_NewRef(level->scope),
            Py_NewRef(level->window_s),
        };
        PyObject *decision = new_tuple_of(DECISION, 8, dfields);
        if (decision == NULL) {
            Py_DECREF(decisions);
            return NULL;
        }
        if (as_list) {
            PyList_SET_ITEM(decisions, i, decision);
        }
        else {
            PyTuple_SET_ITEM(decisions, i, decision);
        }
    }
    if (as_list) {
        return decisions;
    }
    PyObject *vfields[2] = {decisions, Py_NewRef(Py_True)};
    return new_tuple_of(VERDICT, 2, vfields);
}

/* A Level from a Check (policy, scope, identity, cost): 1 done, 0 "don't know", -1 error. */
static int
level_from_check(PyObject *check, PyObject *cached, PyObject *key_fn, Level *level)
{
    int ok;
    if (!PyTuple_Check(check) || PyTuple_GET_SIZE(check) != 4) {
        return 0;
    }
    PyObject *policy = PyTuple_GET_ITEM(check, 0);
    PyObject *scope = PyTuple_GET_ITEM(check, 1);
    PyObject *identity = PyTuple_GET_ITEM(check, 2);
    level->scope = scope;
    if ((ok = exact_int(PyTuple_GET_ITEM(check, 3), &level->cost)) <= 0) {
        return ok;
    }
    PyObject *algorithm = PyObject_GetAttr(policy, s_algorithm);
    if (algorithm == NULL) {
        return -1;
    }
    Py_DECREF(algorithm); /* only its identity is compared; the policy holds it */
    if (algorithm != SC_ALGORITHM) {
        return 0;
    }
    /* The key: KeyBuilder.cached first, KeyBuilder.key on a miss (it may raise). */
    PyObject *cache_key = PyTuple_New(4);
    if (cache_key == NULL) {
        return -1;
    }
    PyTuple_SET_ITEM(cache_key, 0, Py_NewRef(scope));
    PyTuple_SET_ITEM(cache_key, 3, Py_NewRef(identity));
    PyObject *bucket = PyObject_GetAttr(policy, s_bucket);
    PyTuple_SET_ITEM(cache_key, 1, bucket);
    PyObject *code = bucket != NULL ? PyObject_GetAttr(policy, s_code) : NULL;
    PyTuple_SET_ITEM(cache_key, 2, code);
    if (code == NULL) {
        Py_DECREF(cache_key);
        return -1;
    }
    PyObject *key = PyDict_GetItemWithError(cached, cache_key);
    if (key != NULL) {
        Py_INCREF(key);
    }
    else if (!PyErr_Occurred()) {
        key = PyObject_Call(key_fn, cache_key, NULL);
    }
    Py_DECREF(cache_key);
    if (key == NULL) {
        return -1;
    }
    level->key = key;
    PyObject *rate = PyObject_GetAttr(policy, s_rate);
    if (rate == NULL) {
        return -1;
    }
    if ((ok = int_attr(rate, s_period_us, &level->period)) <= 0 ||
        (ok = int_attr(rate, s_limit, &level->limit)) <= 0) {
        Py_DECREF(rate);
        return ok;
    }
    Py_DECREF(rate);
    if ((level->policy_limit = PyObject_GetAttr(policy, s_limit)) == NULL ||
        (level->name = PyObject_GetAttr(policy, s_name)) == NULL ||
        (level->window_s = PyObject_GetAttr(policy, s_window)) == NULL) {
        return -1;
    }
    return 1;
}

/* admit_sc(checks, now, data, cached, key_fn, margin, fresh) -> Verdict | None
 *
 * MemoryBackend._admit_all_py in C (see its docstring for the rules): every level a sliding
 * window counter and every level admitting, or None before anything is changed. New entries
 * are appended to `fresh` as (key, [expires, state]) for the caller to store.
 */
static PyObject *
admit_sc(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "admit_sc takes 7 arguments");
        return NULL;
    }
    if (SC_ALGORITHM == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_speedups.configure() was not called");
        return NULL;
    }
    PyObject *data = args[2], *cached = args[3], *key_fn = args[4], *fresh = args[6];
    long long now, margin;
    int ok;
    if ((ok = exact_int(args[1], &now)) <= 0 || (ok = exact_int(args[5], &margin)) <= 0) {
        return ok < 0 ? NULL : Py_NewRef(Py_None);
    }
    if (!PyDict_Check(data) || !PyDict_Check(cached) || !PyList_Check(fresh)) {
        PyErr_SetString(PyExc_TypeError, "admit_sc: data and cached must be dicts, fresh a list");
        return NULL;
    }
    PyObject *checks = PySequence_Fast(args[0], "checks must be a sequence");
    if (checks == NULL) {
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(checks);
    PyObject **items = PySequence_Fast_ITEMS(checks);
    Level levels[MAX_LEVELS];
    Py_ssize_t filled = 0;
    PyObject *result = NULL;
    if (n == 0 || n > MAX_LEVELS) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    for (; filled < n; filled++) {
        Level *level = &levels[filled];
        memset(level, 0, sizeof *level);
        ok = level_from_check(items[filled], cached, key_fn, level);
        if (ok <= 0) {
            filled++; /* release what it holds */
            result = ok < 0 ? NULL : Py_NewRef(Py_None);
            goto done;
        }
    }
    result = admit_levels(levels, n, now, data, margin, fresh, NULL, 0, 0);
done:
    release_levels(levels, filled);
    Py_DECREF(checks);
    return result;
}

/* -- the middleware's lanes ------------------------------------------------------------------ */

/* Row fields (MemoryBackend.lane_parts). */
enum { R_KEY, R_LIMIT, R_PERIOD, R_POLICY_LIMIT, R_NAME, R_WINDOW, R_SCOPE, R_COST, R_SIZE };

static PyObject *s_type, *s_method, *s_app, *s_root_path, *s_path, *s_client, *s_state,
    *s_user, *s_headers, *s_query_string, *s_backend, *s_lists, *s_quiet, *s_scope_key,
    *s_http, *s_options, *s_empty, *s_decisions;
static PyObject *TIME_NS = NULL; /* time.time_ns: a lane on the system clock reads it in C */

/* scope[name] for an exact dict, borrowed; NULL without an exception when absent. */
#define SCOPE_GET(scope, name) PyDict_GetItemWithError((scope), (name))

/* a == b for an exact str `b`: by identity first (ASGI servers and frameworks send interned
 * constants), then by value; anything but an exact str compares as Python would. 1 equal, 0
 * not, -1 with an exception. */
static int
str_eq(PyObject *a, PyObject *b)
{
    if (a == b) {
        return 1;
    }
    if (!PyUnicode_CheckExact(a)) {
        return PyObject_RichCompareBool(a, b, Py_EQ);
    }
    if (PyUnicode_GET_LENGTH(a) != PyUnicode_GET_LENGTH(b) ||
        PyUnicode_KIND(a) != PyUnicode_KIND(b)) {
        return 0;
    }
    return memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b),
                  PyUnicode_GET_LENGTH(a) * PyUnicode_KIND(a)) == 0;
}

/* The API key in `header` (first occurrence), as identity.api_key_from_scope reads it: 1 with
 * *value set to a new str, 0 when there is none, -1 "don't know" (headers not in the ASGI
 * shape: the Python path reads them its own way). */
static int
header_value(PyObject *scope, PyObject *header, PyObject **value_out)
{
    PyObject *headers = SCOPE_GET(scope, s_headers);
    if (headers == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    if (!PyList_Check(headers) && !PyTuple_Check(headers)) {
        return -1;
    }
    const char *wanted = PyBytes_AS_STRING(header);
    Py_ssize_t wanted_size = PyBytes_GET_SIZE(header);
    Py_ssize_t n = PySequence_Fast_GET_SIZE(headers);
    PyObject **items = PySequence_Fast_ITEMS(headers);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = items[i];
        if ((!PyTuple_Check(pair) && !PyList_Check(pair)) ||
            PySequence_Fast_GET_SIZE(pair) != 2) {
            return -1;
        }
        PyObject *name = PySequence_Fast_GET_ITEM(pair, 0);
        PyObject *value = PySequence_Fast_GET_ITEM(pair, 1);
        if (!PyBytes_CheckExact(name) || !PyBytes_CheckExact(value)) {
            return -1;
        }
        if (PyBytes_GET_SIZE(name) != wanted_size ||
            memcmp(PyBytes_AS_STRING(name), wanted, wanted_size) != 0) {
            continue;
        }
        /* Latin-1, stripped of optional whitespace (space, tab) at both ends. */
        const char *text = PyBytes_AS_STRING(value);
        Py_ssize_t start = 0, end = PyBytes_GET_SIZE(value);
        while (start < end && (text[start] == ' ' || text[start] == '\t')) {
            start++;
        }
        while (end > start && (text[end - 1] == ' ' || text[end - 1] == '\t')) {
            end--;
        }
        if (start == end) {
            return 0; /* the first occurrence decides, even when blank */
        }
        *value_out = PyUnicode_DecodeLatin1(text + start, end - start, NULL);
        return *value_out != NULL ? 1 : -1;
    }
    return 0;
}

/* The lane key, as middleware._lane_key builds it: (method, root_path, path, peer host); NULL
 * without an exception for a request no lane can serve. */
static PyObject *
lane_key(PyObject *scope)
{
    PyObject *type = SCOPE_GET(scope, s_type);
    if (type == NULL || str_eq(type, s_http) != 1) {
        return NULL;
    }
    PyObject *method = SCOPE_GET(scope, s_method);
    if (method == NULL || !PyUnicode_CheckExact(method) || str_eq(method, s_options) != 0) {
        return NULL; /* a preflight's fate depends on its headers */
    }
    PyObject *path = SCOPE_GET(scope, s_path);
    PyObject *root_path = SCOPE_GET(scope, s_root_path);
    PyObject *client = SCOPE_GET(scope, s_client);
    if (path == NULL || client == NULL || !PyUnicode_CheckExact(path) || PyErr_Occurred()) {
        return NULL;
    }
    if (root_path == NULL) {
        root_path = s_empty;
    }
    if (!PyUnicode_CheckExact(root_path) || (!PyTuple_Check(client) && !PyList_Check(client)) ||
        PySequence_Fast_GET_SIZE(client) < 1) {
        return NULL;
    }
    PyObject *host = PySequence_Fast_GET_ITEM(client, 0);
    if (!PyUnicode_CheckExact(host)) {
        return NULL;
    }
    return PyTuple_Pack(4, method, root_path, path, host);
}

/* One level of a lane: its storage key, figures and Decision fields, converted once. */
typedef struct {
    PyObject *key, *scope, *policy_limit, *name, *window_s;
    long long limit, period, cost;
} LaneLevel;

/* middleware._Lane: what deciding a lane's request needs, held in C form. */
typedef struct {
    PyObject_HEAD
    PyObject *app;         /* scope["app"] when the lane was made */
    PyObject *routes;      /* its route list then, and how long it was */
    Py_ssize_t route_count;
    PyObject *backend, *data, *move, *now, *store_new, *ip, *endpoint, *route, *cost, *checks,
        *policy_header;
    PyObject *names;       /* ((policy name, its RateLimit spelling as bytes), ...) or None */
    long long divisor, margin;
    int system_clock;      /* `now` is time.time_ns: read the same clock without a call */
    Py_ssize_t n;
    LaneLevel levels[MAX_LEVELS];
} Lane;

static int
lane_traverse(Lane *self, visitproc visit, void *arg)
{
    Py_VISIT(self->app);
    Py_VISIT(self->routes);
    Py_VISIT(self->backend);
    Py_VISIT(self->data);
    Py_VISIT(self->move);
    Py_VISIT(self->now);
    Py_VISIT(self->store_new);
    Py_VISIT(self->ip);
    Py_VISIT(self->endpoint);
    Py_VISIT(self->route);
    Py_VISIT(self->cost);
    Py_VISIT(self->checks);
    Py_VISIT(self->policy_header);
    Py_VISIT(self->names);
    for (Py_ssize_t i = 0; i < self->n; i++) {
        Py_VISIT(self->levels[i].key);
        Py_VISIT(self->levels[i].scope);
        Py_VISIT(self->levels[i].policy_limit);
        Py_VISIT(self->levels[i].name);
        Py_VISIT(self->levels[i].window_s);
    }
    return 0;
}

static int
lane_clear(Lane *self)
{
    Py_CLEAR(self->app);
    Py_CLEAR(self->routes);
    Py_CLEAR(self->backend);
    Py_CLEAR(self->data);
    Py_CLEAR(self->move);
    Py_CLEAR(self->now);
    Py_CLEAR(self->store_new);
    Py_CLEAR(self->ip);
    Py_CLEAR(self->endpoint);
    Py_CLEAR(self->route);
    Py_CLEAR(self->cost);
    Py_CLEAR(self->checks);
    Py_CLEAR(self->policy_header);
    Py_CLEAR(self->names);
    for (Py_ssize_t i = 0; i < self->n; i++) {
        Py_CLEAR(self->levels[i].key);
        Py_CLEAR(self->levels[i].scope);
        Py_CLEAR(self->levels[i].policy_limit);
        Py_CLEAR(self->levels[i].name);
        Py_CLEAR(self->levels[i].window_s);
    }
    self->n = 0;
    return 0;
}

static void
lane_dealloc(Lane *self)
{
    PyObject_GC_UnTrack(self);
    lane_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *NAME_BYTES; /* headers._name_bytes (defined with the headers, below) */

/* ((name, name_bytes(name)), ...) for the lane's levels, made once: the RateLimit header
 * names the binding policy, and the lane's are always these. None where a name has no such
 * spelling (the headers' own path then raises or falls back, as for any request). */
static PyObject *
lane_names(Lane *self)
{
    if (NAME_BYTES == NULL) {
        Py_RETURN_NONE;
    }
    PyObject *names = PyTuple_New(self->n);
    if (names == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < self->n; i++) {
        PyObject *name = self->levels[i].name;
        PyObject *spelled = PyObject_CallOneArg(NAME_BYTES, name);
        if (spelled == NULL || !PyBytes_CheckExact(spelled)) {
            Py_XDECREF(spelled);
            Py_DECREF(names);
            PyErr_Clear();
            Py_RETURN_NONE;
        }
        PyObject *pair = PyTuple_Pack(2, name, spelled);
        Py_DECREF(spelled);
        if (pair == NULL) {
            Py_DECREF(names);
            return NULL;
        }
        PyTuple_SET_ITEM(names, i, pair);
    }
    return names;
}

/* Lane(app, routes, backend, data, now, divisor, store_new, margin, ip, endpoint, route, cost,
 *      checks, rows, policy_header)
 * ValueError where a figure is outside what C mirrors exactly: that request gets no lane. */
static PyObject *
lane_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *app, *routes, *backend, *data, *now, *divisor, *store_new, *margin, *ip, *endpoint,
        *route, *cost, *checks, *rows, *policy_header;
    if ((kwargs != NULL && PyDict_GET_SIZE(kwargs) > 0) ||
        !PyArg_ParseTuple(args, "OO!OO!OOOOO!O!OOO!O!O:Lane", &app, &PyList_Type, &routes,
                          &backend, &PyDict_Type, &data, &now, &divisor, &store_new, &margin,
                          &PyUnicode_Type, &ip, &PyUnicode_Type, &endpoint, &route, &cost,
                          &PyTuple_Type, &checks, &PyTuple_Type, &rows, &policy_header)) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "Lane takes no keyword arguments");
        }
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(rows);
    if (n == 0 || n > MAX_LEVELS) {
        PyErr_SetString(PyExc_ValueError, "Lane: 1 to 16 levels");
        return NULL;
    }
    long long divisor_value, margin_value, ignored;
    int ok;
    if ((ok = exact_int(divisor, &divisor_value)) <= 0 || divisor_value <= 0 ||
        (ok = exact_int(margin, &margin_value)) <= 0 || (ok = exact_int(cost, &ignored)) <= 0) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError, "Lane: divisor, margin and cost must be exact ints");
        }
        return NULL;
    }
    Lane *self = (Lane *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->app = Py_NewRef(app);
    self->routes = Py_NewRef(routes);
    self->route_count = PyList_GET_SIZE(routes);
    self->backend = Py_NewRef(backend);
    self->data = Py_NewRef(data);
    self->now = Py_NewRef(now);
    self->store_new = Py_NewRef(store_new);
    self->ip = Py_NewRef(ip);
    self->endpoint = Py_NewRef(endpoint);
    self->route = Py_NewRef(route);
    self->cost = Py_NewRef(cost);
    self->checks = Py_NewRef(checks);
    self->policy_header = Py_NewRef(PyBytes_CheckExact(policy_header) ? policy_header : Py_None);
    self->divisor = divisor_value;
    self->margin = margin_value;
    self->system_clock = now == TIME_NS && TIME_NS != NULL;
    /* Bound once: each level's entry moves to the recent end on every request. */
    if ((self->move = PyObject_GetAttr(data, s_move_to_end)) == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *row = PyTuple_GET_ITEM(rows, i);
        if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != R_SIZE) {
            PyErr_SetString(PyExc_TypeError, "Lane: each row is a tuple of 8");
            Py_DECREF(self);
            return NULL;
        }
        LaneLevel *level = &self->levels[i];
        self->n = i + 1; /* from here on, clear() releases this level */
        level->key = Py_NewRef(PyTuple_GET_ITEM(row, R_KEY));
        level->scope = Py_NewRef(PyTuple_GET_ITEM(row, R_SCOPE));
        level->policy_limit = Py_NewRef(PyTuple_GET_ITEM(row, R_POLICY_LIMIT));
        level->name = Py_NewRef(PyTuple_GET_ITEM(row, R_NAME));
        level->window_s = Py_NewRef(PyTuple_GET_ITEM(row, R_WINDOW));
        if ((ok = exact_int(PyTuple_GET_ITEM(row, R_LIMIT), &level->limit)) <= 0 ||
            (ok = exact_int(PyTuple_GET_ITEM(row, R_PERIOD), &level->period)) <= 0 ||
            (ok = exact_int(PyTuple_GET_ITEM(row, R_COST), &level->cost)) <= 0 ||
            level->period <= 0) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_ValueError,
                                "Lane: limit, period and cost must be exact ints (period > 0)");
            }
            Py_DECREF(self);
            return NULL;
        }
    }
    /* Two levels with one storage key: the Python path raises the error for it. */
    for (Py_ssize_t i = 1; i < n; i++) {
        for (Py_ssize_t j = 0; j < i; j++) {
            int same = PyObject_RichCompareBool(self->levels[i].key, self->levels[j].key, Py_EQ);
            if (same != 0) {
                if (same > 0) {
                    PyErr_SetString(PyExc_ValueError, "Lane: two levels share a storage key");
                }
                Py_DECREF(self);
                return NULL;
            }
        }
    }
    self->names = lane_names(self);
    if (self->names == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static PyMemberDef lane_members[] = {
    {"app", T_OBJECT, offsetof(Lane, app), READONLY, "scope['app'] when the lane was made."},
    {"routes", T_OBJECT, offsetof(Lane, routes), READONLY, "Its routes then."},
    {"backend", T_OBJECT, offsetof(Lane, backend), READONLY, "The limiter's backend then."},
    {"ip", T_OBJECT, offsetof(Lane, ip), READONLY, "The context's ip."},
    {"endpoint", T_OBJECT, offsetof(Lane, endpoint), READONLY, "The context's endpoint."},
    {"route", T_OBJECT, offsetof(Lane, route), READONLY, "The context's route."},
    {"cost", T_OBJECT, offsetof(Lane, cost), READONLY, "The context's cost."},
    {"checks", T_OBJECT, offsetof(Lane, checks), READONLY, "The limiter's checks."},
    {"policy_header", T_OBJECT, offsetof(Lane, policy_header), READONLY,
     "RateLimit-Policy for these levels, or None."},
    {NULL, 0, 0, 0, NULL},
};

/* Whether `lane` can still serve a request for `app`: the same app, with as many routes. */
static PyObject *
lane_current(Lane *self, PyObject *app)
{
    return PyBool_FromLong(self->app == app && PyList_GET_SIZE(self->routes) == self->route_count);
}

static PyMethodDef lane_methods[] = {
    {"current", (PyCFunction)lane_current, METH_O,
     "current(app) -> bool: made for this app, whose route list has not grown or shrunk."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fastapi_ratelimit._speedups.Lane",
    .tp_basicsize = sizeof(Lane),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A request's lane (see middleware._Lane): its decision inputs, converted once.",
    .tp_new = lane_new,
    .tp_traverse = (traverseproc)lane_traverse,
    .tp_clear = (inquiry)lane_clear,
    .tp_dealloc = (destructor)lane_dealloc,
    .tp_members = lane_members,
    .tp_methods = lane_methods,
};

/* RequestContext, built without running its __init__: its fields, in declaration order. */
enum {
    C_LIMITER, C_IP, C_API_KEY, C_USER, C_TIER, C_ENDPOINT, C_ROUTE, C_COST, C_KEY_TIER,
    C_DECISIONS, C_CHARGED, C_HANDLED, C_REFUNDABLE, C_REPORTED_COST, C_MIDDLEWARE, C_DENIAL,
    C_EXEMPT, C_REDUCED, C_FIELDS
};
static PyTypeObject *CONTEXT_TYPE = NULL;
static Py_ssize_t CONTEXT_OFFSETS[C_FIELDS];

/* A RequestContext's field, borrowed; NULL where it was deleted (the caller then asks
 * getattr, which raises the usual AttributeError). */
#define CONTEXT_FIELD(context, field) (*(PyObject **)((char *)(context) + CONTEXT_OFFSETS[field]))

/* configure_context(RequestContext, descriptors): the slot descriptors of its fields, in the
 * order above (context.py asserts the names). */
static PyObject *
configure_context(PyObject *module, PyObject *args)
{
    PyObject *type, *descriptors;
    if (!PyArg_ParseTuple(args, "O!O!", &PyType_Type, &type, &PyTuple_Type, &descriptors)) {
        return NULL;
    }
    if (PyTuple_GET_SIZE(descriptors) != C_FIELDS) {
        PyErr_SetString(PyExc_ValueError, "configure_context: one descriptor per field");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < C_FIELDS; i++) {
        PyObject *descriptor = PyTuple_GET_ITEM(descriptors, i);
        if (!Py_IS_TYPE(descriptor, &PyMemberDescr_Type)) {
            PyErr_SetString(PyExc_TypeError, "configure_context: slots only");
            return NULL;
        }
        PyMemberDef *member = ((PyMemberDescrObject *)descriptor)->d_member;
        if (member->type != T_OBJECT_EX ||
            member->offset + (Py_ssize_t)sizeof(PyObject *) >
                ((PyTypeObject *)type)->tp_basicsize) {
            PyErr_SetString(PyExc_TypeError, "configure_context: object slots of this type");
            return NULL;
        }
        CONTEXT_OFFSETS[i] = member->offset;
    }
    Py_XSETREF(CONTEXT_TYPE, (PyTypeObject *)Py_NewRef(type));
    Py_RETURN_NONE;
}

/* A RequestContext as RequestContext(limiter, ip, api_key, None, None, endpoint, route, cost)
 * then `middleware = True` and RateLimiter._record of an admitted verdict would leave it.
 * Steals `decisions` (a new list), also on failure. */
static PyObject *
new_context(PyObject *limiter, PyObject *ip, PyObject *api_key, PyObject *endpoint,
            PyObject *route, PyObject *cost, PyObject *decisions, PyObject *checks)
{
    PyObject *values[C_FIELDS] = {
        [C_LIMITER] = Py_NewRef(limiter),
        [C_IP] = Py_NewRef(ip),
        [C_API_KEY] = Py_NewRef(api_key),
        [C_USER] = Py_NewRef(Py_None),
        [C_TIER] = Py_NewRef(Py_None),
        [C_ENDPOINT] = Py_NewRef(endpoint),
        [C_ROUTE] = Py_NewRef(route),
        [C_COST] = Py_NewRef(cost),
        [C_KEY_TIER] = Py_NewRef(Py_None),
        [C_DECISIONS] = decisions,
        [C_CHARGED] = PySequence_List(checks),
        [C_HANDLED] = PySet_New(NULL),
        [C_REFUNDABLE] = PyList_New(0),
        [C_REPORTED_COST] = Py_NewRef(Py_None),
        [C_MIDDLEWARE] = Py_NewRef(Py_True),
        [C_DENIAL] = Py_NewRef(Py_None),
        [C_EXEMPT] = Py_NewRef(Py_False),
        [C_REDUCED] = Py_NewRef(Py_False),
    };
    PyObject *context = NULL;
    for (int i = 0; i < C_FIELDS; i++) {
        if (values[i] == NULL) {
            goto fail;
        }
    }
    context = CONTEXT_TYPE->tp_alloc(CONTEXT_TYPE, 0);
    if (context == NULL) {
        goto fail;
    }
    for (int i = 0; i < C_FIELDS; i++) {
        *(PyObject **)((char *)context + CONTEXT_OFFSETS[i]) = values[i];
    }
    return context;
fail:
    for (int i = 0; i < C_FIELDS; i++) {
        Py_XDECREF(values[i]);
    }
    return NULL;
}

static PyObject *make_sender(PyObject *send, PyObject *context, Lane *lane);
/* (below, with the Sender type) */
static PyObject *make_run(PyObject *app, PyObject *scope, PyObject *receive, PyObject *sender,
                          PyObject *limiter); /* below, with the LaneRun type */

/* The lane's clock in microseconds, as a new int; NULL with an exception, or Py_None (a new
 * reference) for a reading C can't use. */
static PyObject *
lane_now(Lane *lane, long long *now)
{
#ifdef CLOCK_REALTIME
    if (lane->system_clock) {
        /* time.time_ns() reads this very clock (CPython's _PyTime_GetSystemClock). */
        struct timespec ts;
        if (clock_gettime(CLOCK_REALTIME, &ts) == 0 && ts.tv_sec >= 0) {
            *now = ((long long)ts.tv_sec * 1000000000LL + ts.tv_nsec) / lane->divisor;
            return PyLong_FromLongLong(*now);
        }
    }
#endif
    PyObject *read = PyObject_CallNoArgs(lane->now);
    if (read == NULL) {
        return NULL;
    }
    if (lane->divisor != 1) {
        int overflow = 0;
        long long ns = PyLong_AsLongLongAndOverflow(read, &overflow);
        Py_DECREF(read);
        if (ns == -1 && PyErr_Occurred()) {
            return NULL;
        }
        if (overflow || ns < 0) {
            Py_RETURN_NONE;
        }
        read = PyLong_FromLongLong(ns / lane->divisor);
        if (read == NULL) {
            return NULL;
        }
    }
    int ok = exact_int(read, now);
    if (ok <= 0) {
        Py_DECREF(read);
        return ok < 0 ? NULL : Py_NewRef(Py_None);
    }
    return read;
}

/* lane_admit(lanes, scope, limiter, api_key_header, api_key_query, api_key_counted, send,
 *            app, receive) -> LaneRun | None
 *
 * The middleware's fast path (see middleware._Lane): for a request it has served before --
 * same app, method, path and peer, anonymous, admitted on the memory backend with nothing
 * but the limiter's own levels -- decide the levels in one call, record them in a new
 * context (stored in the scope), wrap `send` in a Sender, call the app with it, and return
 * the awaitable that runs the rest (LaneRun). None, before anything changed, for anything
 * else; the Python path then decides as always.
 */
static PyObject *
lane_admit(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "lane_admit takes 9 arguments");
        return NULL;
    }
    if (CONTEXT_TYPE == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_speedups.configure_context() was not called");
        return NULL;
    }
    PyObject *lanes = args[0], *scope = args[1], *limiter = args[2], *header = args[3],
             *query = args[4], *counted = args[5], *send = args[6], *app_to_call = args[7],
             *receive = args[8];
    if (!PyDict_CheckExact(lanes) || !PyDict_CheckExact(scope) || PyDict_GET_SIZE(lanes) == 0) {
        Py_RETURN_NONE;
    }
    /* Anonymous: no user in the state or the scope (limiter._default_user's sources). */
    PyObject *state = SCOPE_GET(scope, s_state);
    PyObject *user = state != NULL && PyDict_Check(state) ? PyDict_GetItemWithError(state, s_user)
                                                          : NULL;
    if ((user != NULL && user != Py_None) || PyErr_Occurred()) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    user = SCOPE_GET(scope, s_user);
    if ((user != NULL && user != Py_None) || PyErr_Occurred()) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    if (query == Py_True) {
        PyObject *qs = SCOPE_GET(scope, s_query_string);
        if (qs != NULL && PyObject_IsTrue(qs) != 0) {
            PyErr_Clear();
            Py_RETURN_NONE; /* a key may be in the query: the Python path reads it */
        }
    }
    /* The lane: held for the whole call (Python code may run below: the clock, store_new). */
    PyObject *key = lane_key(scope);
    if (key == NULL) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    Lane *lane = (Lane *)PyDict_GetItemWithError(lanes, key);
    Py_DECREF(key);
    PyObject *app = SCOPE_GET(scope, s_app);
    if (lane == NULL || !Py_IS_TYPE(lane, &LaneType) || app != lane->app ||
        PyList_GET_SIZE(lane->routes) != lane->route_count) {
        PyErr_Clear();
        Py_RETURN_NONE; /* none, or made for other routes: the Python path makes a new one */
    }
    Py_INCREF(lane);
    /* An API key goes into the context (route guards read it); where the limiter has an
     * API-key level, it would be one more level: not a lane's request. */
    Level levels[MAX_LEVELS];
    Py_ssize_t n = 0;
    PyObject *result = NULL, *decisions = NULL, *fresh = NULL, *now_obj = NULL, *api_key = NULL;
    long long now;
    if (PyBytes_CheckExact(header)) {
        int found = header_value(scope, header, &api_key);
        if (found < 0 || (found > 0 && counted == Py_True)) {
            goto unknown;
        }
    }
    /* The limiter as it is now: the same backend, and no allow or block list to consult. */
    PyObject *backend = PyObject_GetAttr(limiter, s_backend);
    if (backend == NULL) {
        goto error;
    }
    Py_DECREF(backend); /* identity only */
    if (backend != lane->backend) {
        goto unknown;
    }
    PyObject *lists = PyObject_GetAttr(limiter, s_lists);
    if (lists == NULL) {
        goto error;
    }
    if (lists != Py_None) {
        /* AccessLists.quiet: what known_empty() answers, as a plain attribute. */
        PyObject *empty = PyObject_GetAttr(lists, s_quiet);
        Py_DECREF(lists);
        if (empty == NULL) {
            goto error;
        }
        int quiet = empty == Py_True;
        Py_DECREF(empty);
        if (!quiet) {
            goto unknown;
        }
    }
    else {
        Py_DECREF(lists);
    }
    /* The levels. */
    n = lane->n;
    memset(levels, 0, sizeof(Level) * n);
    for (Py_ssize_t i = 0; i < n; i++) {
        LaneLevel *from = &lane->levels[i];
        Level *level = &levels[i];
        level->key = Py_NewRef(from->key);
        level->policy_limit = Py_NewRef(from->policy_limit);
        level->name = Py_NewRef(from->name);
        level->window_s = Py_NewRef(from->window_s);
        level->scope = from->scope;
        level->limit = from->limit;
        level->period = from->period;
        level->cost = from->cost;
    }
    now_obj = lane_now(lane, &now);
    if (now_obj == NULL) {
        goto error;
    }
    if (now_obj == Py_None || (fresh = PyList_New(0)) == NULL) {
        goto error_or_unknown;
    }
    decisions = admit_levels(levels, n, now, lane->data, lane->margin, fresh, lane->move, 1, 1);
    if (decisions == NULL) {
        goto error;
    }
    if (decisions == Py_None) {
        goto unknown;
    }
    if (PyList_GET_SIZE(fresh) > 0) {
        PyObject *stored = PyObject_CallFunctionObjArgs(lane->store_new, fresh, now_obj, NULL);
        if (stored == NULL) {
            goto error;
        }
        Py_DECREF(stored);
    }
    /* The context, recorded as RateLimiter._record records an admitted verdict. */
    PyObject *context =
        new_context(limiter, lane->ip, api_key != NULL ? api_key : Py_None, lane->endpoint,
                    lane->route, lane->cost, decisions, lane->checks);
    decisions = NULL; /* stolen */
    if (context == NULL) {
        goto error;
    }
    if (PyDict_SetItem(scope, s_scope_key, context) < 0) {
        Py_DECREF(context);
        goto error;
    }
    PyObject *sender = make_sender(send, context, lane);
    Py_DECREF(context);
    if (sender == NULL) {
        goto error;
    }
    result = make_run(app_to_call, scope, receive, sender, limiter);
    Py_DECREF(sender);
    goto done;

error_or_unknown:
    if (PyErr_Occurred()) {
        goto error;
    }
unknown:
    PyErr_Clear(); /* e.g. a key header that is not Latin-1: the Python path meets it again */
    result = Py_NewRef(Py_None);
    goto done;
error:
    result = NULL;
done:
    release_levels(levels, n);
    Py_DECREF(lane);
    Py_XDECREF(api_key);
    Py_XDECREF(decisions);
    Py_XDECREF(fresh);
    Py_XDECREF(now_obj);
    return result;
}

/* -- response headers ---------------------------------------------------------------------- */

/* Decision fields, by position (decision.Decision). */
enum { D_ALLOWED, D_LIMIT, D_REMAINING, D_RESET_AFTER, D_RETRY_AFTER, D_POLICY, D_SCOPE, D_WINDOW };

typedef struct {
    int allowed;
    long long limit, remaining;
    double reset_after, retry_after;
} Figures;

/* An int or float field as a double, exactly as Python would use it; 0 when it is neither. */
static int
number(PyObject *value, double *out)
{
    if (PyFloat_CheckExact(value)) {
        *out = PyFloat_AS_DOUBLE(value);
        return 1;
    }
    long long v;
    int ok = exact_int(value, &v);
    if (ok > 0) {
        *out = (double)v;
    }
    return ok;
}

/* One decision's figures; 0 when a field is not what C can mirror exactly. */
static int
figures_of(PyObject *decision, Figures *out)
{
    if (!PyTuple_Check(decision) || PyTuple_GET_SIZE(decision) != 8) {
        return 0;
    }
    PyObject *allowed = PyTuple_GET_ITEM(decision, D_ALLOWED);
    if (allowed != Py_True && allowed != Py_False) {
        return 0;
    }
    out->allowed = allowed == Py_True;
    int ok;
    if ((ok = exact_int(PyTuple_GET_ITEM(decision, D_LIMIT), &out->limit)) <= 0 ||
        (ok = exact_int(PyTuple_GET_ITEM(decision, D_REMAINING), &out->remaining)) <= 0 ||
        (ok = number(PyTuple_GET_ITEM(decision, D_RESET_AFTER), &out->reset_after)) <= 0 ||
        (ok = number(PyTuple_GET_ITEM(decision, D_RETRY_AFTER), &out->retry_after)) <= 0) {
        return ok;
    }
    /* binding_of divides by the limit: let Python raise for 0. */
    return out->limit != 0;
}

/* decision.binding_of_py in C: the index of the most restrictive decision, -1 for "don't
 * know" (with an exception set only for real errors). */
static Py_ssize_t
binding_index(PyObject **decisions, Py_ssize_t n, Figures *binding)
{
    Figures first, d, best, denied;
    int ok = figures_of(decisions[0], &first);
    if (ok <= 0) {
        return -1;
    }
    if (n == 1) {
        *binding = first;
        return 0;
    }
    Py_ssize_t best_i = 0, denied_i = -1;
    best = first;
    double best_share = (double)first.remaining / (double)first.limit;
    for (Py_ssize_t i = 0; i < n; i++) {
        if ((ok = figures_of(decisions[i], &d)) <= 0) {
            return -1;
        }
        if (!d.allowed) {
            if (denied_i < 0 || d.retry_after > denied.retry_after) {
                denied_i = i;
                denied = d;
            }
        }
        else if (denied_i < 0) {
            double share = (double)d.remaining / (double)d.limit;
            if (share < best_share || (share == best_share && d.remaining < best.remaining)) {
                best_i = i;
                best = d;
                best_share = share;
            }
        }
    }
    if (denied_i >= 0) {
        *binding = denied;
        return denied_i;
    }
    *binding = best;
    return best_i;
}

/* headers._reset_seconds: t, whole seconds rounded up. */
static long long
reset_seconds(const Figures *d)
{
    if (d->allowed) {
        return d->reset_after > 0 ? (long long)ceil(d->reset_after) : 0;
    }
    return d->retry_after > 1 ? (long long)ceil(d->retry_after) : 1;
}

/* Header names, as bytes objects made once (module init). */
enum { H_RATELIMIT_POLICY, H_RATELIMIT, H_X_RATELIMIT_LIMIT, H_X_RATELIMIT_REMAINING, H_X_RATELIMIT_RESET, H_X_RATELIMIT_USED, H_X_RATELIMIT_SCOPE, H_RATELIMIT_LIMIT, H_RATELIMIT_REMAINING, H_RATELIMIT_RESET, H_COUNT };
static const char *const HEADER_TEXT[H_COUNT] = {"ratelimit-policy", "ratelimit", "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "x-ratelimit-used", "x-ratelimit-scope", "ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"};
static PyObject *HEADER_BYTES[H_COUNT];

static int
append_header(PyObject *list, int name, PyObject *value)
{
    /* Steals `value`. */
    if (value == NULL) {
        return -1;
    }
    PyObject *pair = PyTuple_New(2);
    if (pair == NULL) {
        Py_DECREF(value);
        return -1;
    }
    PyTuple_SET_ITEM(pair, 0, Py_NewRef(HEADER_BYTES[name]));
    PyTuple_SET_ITEM(pair, 1, value);
    int rc = PyList_Append(list, pair);
    Py_DECREF(pair);
    return rc;
}

/* The decimal digits of `value` at `out` (room for 21 bytes); returns their count. */
static int
format_ll(char *out, long long value)
{
    char digits[24];
    int n = 0;
    unsigned long long v = value < 0 ? 0ULL - (unsigned long long)value : (unsigned long long)value;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v > 0);
    int size = 0;
    if (value < 0) {
        out[size++] = '-';
    }
    while (n > 0) {
        out[size++] = digits[--n];
    }
    return size;
}

static PyObject *
int_bytes(long long value)
{
    char text[24];
    return PyBytes_FromStringAndSize(text, format_ll(text, value));
}

/* Styles, by position in the tuple given to configure_headers (HeaderStyle members). */
enum { STYLE_IETF, STYLE_X, STYLE_BOTH, STYLE_LEGACY, STYLE_NONE, STYLE_COUNT };

/* Set by configure_headers (headers.py, at import). */
static PyObject *POLICY_HEADER = NULL; /* headers._policy_header (cached) */
static PyObject *NAME_BYTES = NULL;    /* headers._name_bytes (cached) */
static PyObject *POLICY_FIELDS = NULL; /* headers._POLICY_FIELDS (an itemgetter) */
static PyObject *TIME_FN = NULL;       /* time.time */
static PyObject *STYLES[STYLE_COUNT];  /* the HeaderStyle members */
static PyObject *STYLE_NAMES[STYLE_COUNT]; /* headers.HEADER_NAMES[style], frozensets */
static PyObject *HEADERS_PY = NULL;    /* headers.rate_limit_headers_py */
static PyObject *HEADER_NAMES_BY_STYLE = NULL; /* headers.HEADER_NAMES */

static PyObject *
configure_headers(PyObject *module, PyObject *args)
{
    PyObject *policy_header, *name_bytes, *policy_fields, *time_fn, *styles, *names, *python,
        *by_style;
    if (!PyArg_ParseTuple(args, "OOOOO!O!OO", &policy_header, &name_bytes, &policy_fields,
                          &time_fn, &PyTuple_Type, &styles, &PyTuple_Type, &names, &python,
                          &by_style)) {
        return NULL;
    }
    if (PyTuple_GET_SIZE(styles) != STYLE_COUNT || PyTuple_GET_SIZE(names) != STYLE_COUNT) {
        PyErr_SetString(PyExc_ValueError, "configure_headers: five styles and their names");
        return NULL;
    }
    Py_XSETREF(POLICY_HEADER, Py_NewRef(policy_header));
    Py_XSETREF(NAME_BYTES, Py_NewRef(name_bytes));
    Py_XSETREF(POLICY_FIELDS, Py_NewRef(policy_fields));
    Py_XSETREF(TIME_FN, Py_NewRef(time_fn));
    Py_XSETREF(HEADERS_PY, Py_NewRef(python));
    Py_XSETREF(HEADER_NAMES_BY_STYLE, Py_NewRef(by_style));
    for (int i = 0; i < STYLE_COUNT; i++) {
        Py_XSETREF(STYLES[i], Py_NewRef(PyTuple_GET_ITEM(styles, i)));
        Py_XSETREF(STYLE_NAMES[i], Py_NewRef(PyTuple_GET_ITEM(names, i)));
    }
    Py_RETURN_NONE;
}

/* The code of a HeaderStyle member, by identity (hashing an Enum member runs Python code);
 * -1 for anything else (a plain string: the Python twin compares it with ==). */
static int
style_code(PyObject *style)
{
    for (int i = 0; i < STYLE_COUNT; i++) {
        if (style == STYLES[i]) {
            return i;
        }
    }
    return -1;
}

/* headers.rate_limit_headers_py in C for a style code other than "none". `now` may be NULL:
 * time.time() is then read if the style needs it. Returns a new list, Py_None (a new
 * reference) for what C leaves to Python, or NULL with an exception. */
static PyObject *
build_headers(PyObject *seq, int style, PyObject *now_obj, PyObject *policy_header,
              PyObject *names)
{
    if (POLICY_HEADER == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_speedups.configure_headers() was not called");
        return NULL;
    }
    if (style < STYLE_IETF || style > STYLE_LEGACY) {
        Py_RETURN_NONE;
    }
    PyObject *decisions = PySequence_Fast(seq, "decisions must be a sequence");
    if (decisions == NULL) {
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(decisions);
    PyObject **items = PySequence_Fast_ITEMS(decisions);
    PyObject *result = NULL;
    Figures binding;
    Py_ssize_t index = n > 0 ? binding_index(items, n, &binding) : -1;
    if (index < 0) {
        if (!PyErr_Occurred()) {
            result = Py_NewRef(Py_None);
        }
        goto done;
    }
    PyObject *bound = items[index];
    long long t = reset_seconds(&binding);
    long long remaining = binding.remaining > 0 ? binding.remaining : 0;
    result = PyList_New(0);
    if (result == NULL) {
        goto done;
    }
    if (style == STYLE_IETF || style == STYLE_BOTH) {
        PyObject *policy = NULL;
        if (policy_header != NULL) {
            policy = Py_NewRef(policy_header); /* the caller's, for these very decisions */
        }
        else {
            /* The cache key: (policy, limit, window) of each decision, as the Python twin. */
            PyObject *key = PyTuple_New(n);
            if (key == NULL) {
                goto error;
            }
            for (Py_ssize_t i = 0; i < n; i++) {
                PyObject *fields = PyObject_CallOneArg(POLICY_FIELDS, items[i]);
                if (fields == NULL) {
                    Py_DECREF(key);
                    goto error;
                }
                PyTuple_SET_ITEM(key, i, fields);
            }
            policy = PyObject_CallOneArg(POLICY_HEADER, key);
            Py_DECREF(key);
        }
        if (append_header(result, H_RATELIMIT_POLICY, policy) < 0) {
            goto error;
        }
        /* The binding policy's name as bytes: a lane's, made once, where it is that name. */
        PyObject *policy_name = PyTuple_GET_ITEM(bound, D_POLICY);
        PyObject *pair = names != NULL && index < PyTuple_GET_SIZE(names)
                             ? PyTuple_GET_ITEM(names, index)
                             : NULL;
        PyObject *name = pair != NULL && PyTuple_GET_ITEM(pair, 0) == policy_name
                             ? Py_NewRef(PyTuple_GET_ITEM(pair, 1))
                             : PyObject_CallOneArg(NAME_BYTES, policy_name);
        if (name == NULL) {
            goto error;
        }
        if (!PyBytes_Check(name)) {
            Py_DECREF(name);
            PyErr_SetString(PyExc_TypeError, "name_bytes must return bytes");
            goto error;
        }
        /* '"<name>";r=<remaining>;t=<t>': names are short (validated), numbers <= 20 digits. */
        char text[320];
        Py_ssize_t length = PyBytes_GET_SIZE(name);
        if (length > 256) {
            Py_DECREF(name);
            Py_SETREF(result, Py_NewRef(Py_None)); /* a name too long: the Python twin */
            goto done;
        }
        Py_ssize_t size = 0;
        text[size++] = '"';
        memcpy(text + size, PyBytes_AS_STRING(name), length);
        size += length;
        Py_DECREF(name);
        memcpy(text + size, "\";r=", 4);
        size += 4;
        size += format_ll(text + size, remaining);
        memcpy(text + size, ";t=", 3);
        size += 3;
        size += format_ll(text + size, t);
        PyObject *status = PyBytes_FromStringAndSize(text, size);
        if (append_header(result, H_RATELIMIT, status) < 0) {
            goto error;
        }
    }
    if (style == STYLE_X || style == STYLE_BOTH) {
        double now;
        PyObject *read = now_obj != NULL ? Py_NewRef(now_obj) : PyObject_CallNoArgs(TIME_FN);
        if (read == NULL) {
            goto error;
        }
        int ok = number(read, &now);
        Py_DECREF(read);
        if (ok <= 0) {
            if (ok == 0) {
                Py_SETREF(result, Py_NewRef(Py_None));
                goto done;
            }
            goto error;
        }
        PyObject *scope = PyTuple_GET_ITEM(bound, D_SCOPE);
        long long used = binding.limit - remaining;
        if (append_header(result, H_X_RATELIMIT_LIMIT, int_bytes(binding.limit)) < 0 ||
            append_header(result, H_X_RATELIMIT_REMAINING, int_bytes(remaining)) < 0 ||
            append_header(result, H_X_RATELIMIT_RESET,
                          int_bytes((long long)ceil(now + (double)t))) < 0 ||
            append_header(result, H_X_RATELIMIT_USED, int_bytes(used > 0 ? used : 0)) < 0) {
            goto error;
        }
        PyObject *text = PyObject_Str(scope);
        if (text == NULL) {
            goto error;
        }
        PyObject *encoded = PyUnicode_AsLatin1String(text);
        Py_DECREF(text);
        if (append_header(result, H_X_RATELIMIT_SCOPE, encoded) < 0) {
            goto error;
        }
    }
    if (style == STYLE_LEGACY) {
        if (append_header(result, H_RATELIMIT_LIMIT, int_bytes(binding.limit)) < 0 ||
            append_header(result, H_RATELIMIT_REMAINING, int_bytes(remaining)) < 0 ||
            append_header(result, H_RATELIMIT_RESET, int_bytes(t)) < 0) {
            goto error;
        }
    }
    goto done;
error:
    Py_CLEAR(result);
done:
    Py_DECREF(decisions);
    return result;
}

/* rate_limit_headers(decisions, style, now) -> list | None
 *
 * headers.rate_limit_headers_py for a HeaderStyle member other than NONE and a non-empty
 * decision list; None where the Python twin must answer.
 */
static PyObject *
rate_limit_headers(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "rate_limit_headers takes 3 arguments");
        return NULL;
    }
    return build_headers(args[0], style_code(args[1]), args[2], NULL, NULL);
}

/* -- the lanes' ASGI send wrapper ------------------------------------------------------------ */

static PyObject *s_status, *s_limiter, *s_header_style, *s_denial, *s_get, *s_lower,
    *s_start_type, *s_body_type;
static PyObject *INT_429 = NULL;
static PyObject *SEND_DENIAL = NULL; /* middleware._send_denial(send, context, denial) */
static PyObject *NOTHING = NULL;     /* middleware._nothing() */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall; /* sender_vectorcall: a call costs no argument tuple */
    PyObject *send;    /* the next send */
    PyObject *context; /* the RequestContext */
    PyObject *status;  /* the response status, once started */
    Lane *lane;        /* the lane: RateLimit-Policy and names for its own decisions */
    int replaced;      /* a guard's denial was sent instead: drop the app's body */
} Sender;

static int
sender_traverse(Sender *self, visitproc visit, void *arg)
{
    Py_VISIT(self->send);
    Py_VISIT(self->context);
    Py_VISIT(self->status);
    Py_VISIT(self->lane);
    return 0;
}

static int
sender_clear(Sender *self)
{
    Py_CLEAR(self->send);
    Py_CLEAR(self->context);
    Py_CLEAR(self->status);
    Py_CLEAR(self->lane);
    return 0;
}

static void
sender_dealloc(Sender *self)
{
    PyObject_GC_UnTrack(self);
    sender_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject SenderType;
static PyObject *sender_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf,
                                   PyObject *kwnames);

/* A lane request's Sender: the lane's RateLimit-Policy (bytes or None) and names describe
 * the context's first lane->n decisions. */
static PyObject *
make_sender(PyObject *send, PyObject *context, Lane *lane)
{
    Sender *self = (Sender *)SenderType.tp_alloc(&SenderType, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = (vectorcallfunc)sender_vectorcall;
    self->send = Py_NewRef(send);
    self->context = Py_NewRef(context);
    self->status = Py_NewRef(Py_None);
    self->lane = (Lane *)Py_NewRef(lane);
    self->replaced = 0;
    return (PyObject *)self;
}

/* The app's header list with ours, each of our names once (the app's own copies dropped):
 * middleware._Responder.send's merge. */
static PyObject *
merged_headers(PyObject *headers, PyObject *ours, PyObject *names)
{
    PyObject *app = PySequence_Fast(headers, "headers must be a sequence");
    if (app == NULL) {
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(app);
    PyObject **items = PySequence_Fast_ITEMS(app);
    PyObject *result = PyList_New(0);
    if (result == NULL) {
        Py_DECREF(app);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *name = PySequence_GetItem(items[i], 0);
        if (name == NULL) {
            goto error;
        }
        /* Servers send lower-case bytes: only others need lower(). */
        int clash;
        if (PyBytes_CheckExact(name)) {
            const char *text = PyBytes_AS_STRING(name);
            Py_ssize_t size = PyBytes_GET_SIZE(name);
            int upper = 0;
            for (Py_ssize_t j = 0; j < size && !upper; j++) {
                upper = text[j] >= 'A' && text[j] <= 'Z';
            }
            if (upper) {
                PyObject *lowered = PyObject_CallMethodNoArgs(name, s_lower);
                Py_SETREF(name, lowered);
                if (name == NULL) {
                    goto error;
                }
            }
            clash = PySet_Contains(names, name);
        }
        else {
            PyObject *lowered = PyObject_CallMethodNoArgs(name, s_lower);
            Py_SETREF(name, lowered);
            if (name == NULL) {
                goto error;
            }
            clash = PySet_Contains(names, name);
        }
        Py_DECREF(name);
        if (clash < 0) {
            goto error;
        }
        if (!clash && PyList_Append(result, items[i]) < 0) {
            goto error;
        }
    }
    Py_DECREF(app);
    if (PyList_SetSlice(result, PY_SSIZE_T_MAX, PY_SSIZE_T_MAX, ours) < 0) {
        Py_DECREF(result);
        return NULL;
    }
    return result;
error:
    Py_DECREF(app);
    Py_DECREF(result);
    return NULL;
}

/* context.<field> as a new reference: the slot itself (lane contexts are RequestContexts),
 * or getattr where it is empty, which raises the AttributeError Python would. */
static PyObject *
context_get(PyObject *context, int field, PyObject *name)
{
    PyObject *value = Py_IS_TYPE(context, CONTEXT_TYPE) ? CONTEXT_FIELD(context, field) : NULL;
    return value != NULL ? Py_NewRef(value) : PyObject_GetAttr(context, name);
}

/* Add our headers to an http.response.start message; 0 done, -1 error. */
static int
add_headers(Sender *self, PyObject *message)
{
    PyObject *limiter = context_get(self->context, C_LIMITER, s_limiter);
    if (limiter == NULL) {
        return -1;
    }
    PyObject *style = PyObject_GetAttr(limiter, s_header_style);
    Py_DECREF(limiter);
    if (style == NULL) {
        return -1;
    }
    PyObject *decisions = context_get(self->context, C_DECISIONS, s_decisions);
    int rc = -1;
    PyObject *ours = NULL, *names = NULL, *merged = NULL;
    if (decisions == NULL) {
        goto done;
    }
    int has = PyObject_IsTrue(decisions);
    if (has < 0) {
        goto done;
    }
    int code = style_code(style);
    if (!has || code == STYLE_NONE) {
        rc = 0;
        goto done;
    }
    /* The lane's RateLimit-Policy holds while the decisions are the lane's own (a guard that
     * checks itself may have added more). */
    Lane *lane = self->lane;
    int own = PyList_Check(decisions) && PyList_GET_SIZE(decisions) == lane->n;
    PyObject *policy = own && lane->policy_header != Py_None ? lane->policy_header : NULL;
    PyObject *spelled = own && lane->names != Py_None ? lane->names : NULL;
    ours = code >= 0 ? build_headers(decisions, code, NULL, policy, spelled) : Py_NewRef(Py_None);
    if (ours == Py_None) {
        /* The Python twin: a plain-string style, or figures C can't mirror exactly. */
        PyObject *now = PyObject_CallNoArgs(TIME_FN);
        Py_SETREF(ours, now == NULL ? NULL : PyObject_CallFunctionObjArgs(HEADERS_PY,
                                                                            decisions, style,
                                                                            now, NULL));
        Py_XDECREF(now);
    }
    if (ours == NULL) {
        goto done;
    }
    names = code >= 0 ? Py_NewRef(STYLE_NAMES[code]) : NULL;
    if (names == NULL) {
        /* HEADER_NAMES[style], as the Python twin looks it up (it may raise the same way). */
        names = PyObject_GetItem(HEADER_NAMES_BY_STYLE, style);
        if (names == NULL) {
            goto done;
        }
    }
    PyObject *headers = NULL;
    if (PyDict_CheckExact(message)) {
        headers = PyDict_GetItemWithError(message, s_headers);
        if (headers == NULL && PyErr_Occurred()) {
            goto done;
        }
        Py_XINCREF(headers);
    }
    else {
        headers = PyObject_CallMethodOneArg(message, s_get, s_headers);
        if (headers == NULL) {
            goto done;
        }
        if (headers == Py_None) {
            Py_CLEAR(headers);
        }
    }
    if (headers == NULL) {
        headers = PyTuple_New(0);
        if (headers == NULL) {
            goto done;
        }
    }
    merged = merged_headers(headers, ours, names);
    Py_DECREF(headers);
    if (merged == NULL || PyObject_SetItem(message, s_headers, merged) < 0) {
        goto done;
    }
    rc = 0;
done:
    Py_DECREF(style);
    Py_XDECREF(decisions);
    Py_XDECREF(ours);
    Py_XDECREF(names);
    Py_XDECREF(merged);
    return rc;
}

/* message[name] for a message dict, borrowed; NULL with a KeyError where it is missing, as
 * the Python twin's message[name] raises. Other mappings: their own __getitem__. */
static PyObject *
message_get(PyObject *message, PyObject *name, PyObject **owned)
{
    *owned = NULL;
    if (PyDict_CheckExact(message)) {
        PyObject *value = PyDict_GetItemWithError(message, name);
        if (value == NULL && !PyErr_Occurred()) {
            PyErr_SetObject(PyExc_KeyError, name);
        }
        return value;
    }
    return *owned = PyObject_GetItem(message, name);
}

/* sender(message) -> the next send's awaitable (middleware._Responder.send, in C). */
static PyObject *
sender_send(Sender *self, PyObject *message)
{
    if (SEND_DENIAL == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_speedups.configure_sender() was not called");
        return NULL;
    }
    PyObject *owned;
    PyObject *kind = message_get(message, s_type, &owned);
    if (kind == NULL) {
        return NULL;
    }
    int start = str_eq(kind, s_start_type);
    int body = start == 0 ? str_eq(kind, s_body_type) : 0;
    Py_XDECREF(owned);
    if (start < 0 || body < 0) {
        return NULL;
    }
    if (start) {
        PyObject *status = message_get(message, s_status, &owned);
        if (status == NULL) {
            return NULL;
        }
        Py_XSETREF(self->status, Py_NewRef(status));
        Py_XDECREF(owned);
        int denied = PyObject_RichCompareBool(self->status, INT_429, Py_EQ);
        if (denied < 0) {
            return NULL;
        }
        if (denied) {
            PyObject *denial = context_get(self->context, C_DENIAL, s_denial);
            if (denial == NULL) {
                return NULL;
            }
            if (denial != Py_None) {
                /* A route guard denied: its problem+json 429 instead of the app's body. */
                self->replaced = 1;
                PyObject *sent = PyObject_CallFunctionObjArgs(SEND_DENIAL, self->send,
                                                              self->context, denial, NULL);
                Py_DECREF(denial);
                return sent;
            }
            Py_DECREF(denial);
        }
        if (add_headers(self, message) < 0) {
            return NULL;
        }
    }
    else if (body && self->replaced) {
        return PyObject_CallNoArgs(NOTHING);
    }
    return PyObject_CallOneArg(self->send, message);
}

static PyObject *
sender_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) > 0)) {
        PyErr_SetString(PyExc_TypeError, "send(message) takes exactly one positional argument");
        return NULL;
    }
    return sender_send((Sender *)self, args[0]);
}

static PyMemberDef sender_members[] = {
    {"status", T_OBJECT, offsetof(Sender, status), READONLY,
     "The response status, once the response started (None before)."},
    {"context", T_OBJECT, offsetof(Sender, context), READONLY, "The request's context."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject SenderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fastapi_ratelimit._speedups.Sender",
    .tp_basicsize = sizeof(Sender),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "middleware._Responder.send in C, for lane requests (made by lane_admit).",
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Sender, vectorcall),
    .tp_traverse = (traverseproc)sender_traverse,
    .tp_clear = (inquiry)sender_clear,
    .tp_dealloc = (destructor)sender_dealloc,
    .tp_members = sender_members,
};

/* -- the lanes' awaitable ---------------------------------------------------------------------- */

/* What `await self.app(scope, receive, sender)` and the after-response step of the
 * middleware's Python path do for a lane request, as an awaitable of its own: the middleware
 * hands it straight to the server, so a lane request costs no coroutine of ours. It drives
 * the app's awaitable, then, where the request needs it (a cost the endpoint reported, or a
 * guard's refund), limiter.after_response(context, status); its result is None. It has the
 * coroutine protocol (send, throw, close, __await__), so cancellation and close reach the app
 * exactly as through a coroutine. */
typedef struct {
    PyObject_HEAD
    PyObject *inner;   /* the iterator being driven: the app's, then after_response's */
    PyObject *sender;  /* the request's Sender (its context and status) */
    PyObject *limiter;
    int after;         /* the app finished: inner, if any, is after_response's */
} LaneRun;

static PyObject *s_throw, *s_close, *s_after_response, *s_refundable, *s_reported_cost;

static int
run_traverse(LaneRun *self, visitproc visit, void *arg)
{
    Py_VISIT(self->inner);
    Py_VISIT(self->sender);
    Py_VISIT(self->limiter);
    return 0;
}

static int
run_clear(LaneRun *self)
{
    Py_CLEAR(self->inner);
    Py_CLEAR(self->sender);
    Py_CLEAR(self->limiter);
    return 0;
}

static void
run_dealloc(LaneRun *self)
{
    PyObject_GC_UnTrack(self);
    run_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The iterator `await awaitable` drives, as CPython's GET_AWAITABLE finds it. */
static PyObject *
await_iter(PyObject *awaitable)
{
    if (PyCoro_CheckExact(awaitable)) {
        return Py_NewRef(awaitable);
    }
    if (PyGen_CheckExact(awaitable)) {
        /* A generator-based coroutine (@types.coroutine) is awaitable as itself. */
        PyObject *code = PyObject_GetAttrString(awaitable, "gi_code");
        int iterable = code != NULL && PyCode_Check(code) &&
                       (((PyCodeObject *)code)->co_flags & CO_ITERABLE_COROUTINE);
        Py_XDECREF(code);
        if (iterable) {
            return Py_NewRef(awaitable);
        }
        PyErr_Clear();
    }
    PyAsyncMethods *am = Py_TYPE(awaitable)->tp_as_async;
    if (am == NULL || am->am_await == NULL) {
        PyErr_Format(PyExc_TypeError, "object %.100s can't be used in 'await' expression",
                     Py_TYPE(awaitable)->tp_name);
        return NULL;
    }
    PyObject *iterator = am->am_await(awaitable);
    if (iterator != NULL && (PyCoro_CheckExact(iterator) || !PyIter_Check(iterator))) {
        PyErr_Format(PyExc_TypeError, "__await__() returned %s",
                     PyCoro_CheckExact(iterator) ? "a coroutine" : "a non-iterator");
        Py_CLEAR(iterator);
    }
    return iterator;
}

/* limiter.needs_after_response(context) for a lane's context: a lane's limiter has no work
 * after every response (RateLimiter.lane_for), so refunds and a reported cost decide. */
static int
run_needs_after(LaneRun *self)
{
    PyObject *context = ((Sender *)self->sender)->context;
    PyObject *refundable = context_get(context, C_REFUNDABLE, s_refundable);
    if (refundable == NULL) {
        return -1;
    }
    int some = PyObject_IsTrue(refundable);
    Py_DECREF(refundable);
    if (some != 0) {
        return some;
    }
    PyObject *reported = context_get(context, C_REPORTED_COST, s_reported_cost);
    if (reported == NULL) {
        return -1;
    }
    Py_DECREF(reported);
    return reported != Py_None;
}

/* Carry on from what driving `inner` gave: when it returned, move to the next stage. */
static PySendResult
run_continue(LaneRun *self, PySendResult status, PyObject **result)
{
    while (status == PYGEN_RETURN) {
        Py_CLEAR(*result); /* the app's return value: `await self.app(...)` discards it */
        Py_CLEAR(self->inner);
        if (self->after) {
            *result = Py_NewRef(Py_None);
            return PYGEN_RETURN;
        }
        self->after = 1;
        int needed = run_needs_after(self);
        if (needed <= 0) {
            *result = needed < 0 ? NULL : Py_NewRef(Py_None);
            return needed < 0 ? PYGEN_ERROR : PYGEN_RETURN;
        }
        Sender *sender = (Sender *)self->sender;
        PyObject *coroutine = PyObject_CallMethodObjArgs(self->limiter, s_after_response,
                                                         sender->context, sender->status, NULL);
        if (coroutine == NULL) {
            return PYGEN_ERROR;
        }
        self->inner = await_iter(coroutine);
        Py_DECREF(coroutine);
        if (self->inner == NULL) {
            return PYGEN_ERROR;
        }
        status = PyIter_Send(self->inner, Py_None, result);
    }
    if (status == PYGEN_ERROR) {
        Py_CLEAR(self->inner);
    }
    return status;
}

static PySendResult
run_am_send(LaneRun *self, PyObject *arg, PyObject **result)
{
    if (self->inner == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited coroutine");
        *result = NULL;
        return PYGEN_ERROR;
    }
    return run_continue(self, PyIter_Send(self->inner, arg, result), result);
}

/* The iterator protocol's answer for a send result: the yielded value, or NULL with
 * StopIteration (result None: no exception needed for tp_iternext, but send() raises). */
static PyObject *
run_yield(PySendResult status, PyObject *result, int raise_stop)
{
    if (status == PYGEN_NEXT) {
        return result;
    }
    if (status == PYGEN_RETURN) {
        Py_DECREF(result); /* always None */
        if (raise_stop) {
            PyErr_SetNone(PyExc_StopIteration);
        }
    }
    return NULL;
}

static PyObject *
run_iternext(LaneRun *self)
{
    PyObject *result;
    PySendResult status = run_am_send(self, Py_None, &result);
    return run_yield(status, result, 0);
}

static PyObject *
run_send(LaneRun *self, PyObject *arg)
{
    PyObject *result;
    PySendResult status = run_am_send(self, arg, &result);
    return run_yield(status, result, 1);
}

static PyObject *
run_throw(LaneRun *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "throw expected 1 to 3 arguments");
        return NULL;
    }
    if (self->inner == NULL) {
        /* Finished: raise it here, as a finished coroutine's throw() does. */
        PyObject *exception = args[0];
        if (PyExceptionInstance_Check(exception)) {
            PyErr_SetObject((PyObject *)Py_TYPE(exception), exception);
        }
        else if (PyExceptionClass_Check(exception)) {
            PyErr_SetObject(exception, nargs > 1 && args[1] != Py_None ? args[1] : NULL);
        }
        else {
            PyErr_SetString(PyExc_TypeError, "exceptions must derive from BaseException");
        }
        return NULL;
    }
    PyObject *throw = PyObject_GetAttr(self->inner, s_throw);
    if (throw == NULL) {
        return NULL;
    }
    PyObject *result = PyObject_Vectorcall(throw, args, nargs, NULL);
    Py_DECREF(throw);
    if (result != NULL) {
        return result; /* the inner awaitable caught it and yielded */
    }
    if (!PyErr_ExceptionMatches(PyExc_StopIteration)) {
        Py_CLEAR(self->inner);
        return NULL;
    }
    /* It caught it and returned: its value is StopIteration.value. */
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    PyObject *returned = value != NULL ? PyObject_GetAttrString(value, "value") : NULL;
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    if (returned == NULL) {
        Py_CLEAR(self->inner);
        return NULL;
    }
    PySendResult status = run_continue(self, PYGEN_RETURN, &returned);
    return run_yield(status, returned, 1);
}

static PyObject *
run_close(LaneRun *self, PyObject *unused)
{
    self->after = 1; /* closed: nothing more runs */
    PyObject *inner = self->inner;
    if (inner == NULL) {
        Py_RETURN_NONE;
    }
    self->inner = NULL;
    PyObject *close = PyObject_GetAttr(inner, s_close);
    PyObject *result = close != NULL ? PyObject_CallNoArgs(close) : NULL;
    Py_XDECREF(close);
    Py_DECREF(inner);
    if (result == NULL) {
        if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear(); /* an iterator without close(): nothing to close */
            Py_RETURN_NONE;
        }
        return NULL;
    }
    Py_DECREF(result);
    Py_RETURN_NONE;
}

static PyObject *
run_await(LaneRun *self)
{
    return Py_NewRef(self);
}

static PyMethodDef run_methods[] = {
    {"send", (PyCFunction)run_send, METH_O, "send(value): resume the request."},
    {"throw", (PyCFunction)(void (*)(void))run_throw, METH_FASTCALL,
     "throw(exception): raise it where the request waits."},
    {"close", (PyCFunction)run_close, METH_NOARGS, "close(): close the request's awaitable."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef run_members[] = {
    {"sender", T_OBJECT, offsetof(LaneRun, sender), READONLY,
     "The request's Sender (its context and status)."},
    {NULL, 0, 0, 0, NULL},
};

static PyAsyncMethods run_async = {
    .am_await = (unaryfunc)run_await,
    .am_send = (sendfunc)run_am_send,
};

static PyTypeObject LaneRunType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fastapi_ratelimit._speedups.LaneRun",
    .tp_basicsize = sizeof(LaneRun),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A lane request's app call and after-response step, as one awaitable.",
    .tp_as_async = &run_async,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)run_iternext,
    .tp_traverse = (traverseproc)run_traverse,
    .tp_clear = (inquiry)run_clear,
    .tp_dealloc = (destructor)run_dealloc,
    .tp_methods = run_methods,
    .tp_members = run_members,
};

/* The awaitable for a lane request: app(scope, receive, sender) called now (as `await
 * self.app(...)` would, first thing), driven when awaited. */
static PyObject *
make_run(PyObject *app, PyObject *scope, PyObject *receive, PyObject *sender, PyObject *limiter)
{
    PyObject *args[3] = {scope, receive, sender};
    PyObject *awaitable = PyObject_Vectorcall(app, args, 3, NULL);
    if (awaitable == NULL) {
        return NULL;
    }
    PyObject *inner = await_iter(awaitable);
    Py_DECREF(awaitable);
    if (inner == NULL) {
        return NULL;
    }
    LaneRun *self = PyObject_GC_New(LaneRun, &LaneRunType);
    if (self == NULL) {
        Py_DECREF(inner);
        return NULL;
    }
    self->inner = inner;
    self->sender = Py_NewRef(sender);
    self->limiter = Py_NewRef(limiter);
    self->after = 0;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static PyObject *
configure_sender(PyObject *module, PyObject *args)
{
    PyObject *send_denial, *nothing;
    if (!PyArg_ParseTuple(args, "OO", &send_denial, &nothing)) {
        return NULL;
    }
    Py_XSETREF(SEND_DENIAL, Py_NewRef(send_denial));
    Py_XSETREF(NOTHING, Py_NewRef(nothing));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(sliding_window_counter, Decision, Verdict): the types admit_sc works with."},
    {"admit_sc", (PyCFunction)(void (*)(void))admit_sc, METH_FASTCALL,
     "admit_sc(checks, now, data, cached, key_fn, margin, fresh) -> Verdict | None"},
    {"lane_admit", (PyCFunction)(void (*)(void))lane_admit, METH_FASTCALL,
     "lane_admit(lanes, scope, limiter, api_key_header, api_key_query, api_key_counted, send, "
     "app, receive) -> LaneRun | None"},
    {"configure_context", configure_context, METH_VARARGS,
     "configure_context(RequestContext, descriptors): how lane_admit builds contexts."},
    {"rate_limit_headers", (PyCFunction)(void (*)(void))rate_limit_headers, METH_FASTCALL,
     "rate_limit_headers(decisions, style, now) -> list | None"},
    {"configure_headers", configure_headers, METH_VARARGS,
     "configure_headers(policy_header, name_bytes, policy_fields, time, styles, names, "
     "python, names_by_style): the helpers and constants of fastapi_ratelimit.headers."},
    {"configure_sender", configure_sender, METH_VARARGS,
     "configure_sender(send_denial, nothing): the middleware's helpers for Sender."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "fastapi_ratelimit._speedups",
    "C versions of the memory backend's and the headers' per-request hot path.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
#define INTERN(var, text)                                                                      \
    if ((var = PyUnicode_InternFromString(text)) == NULL) {                                    \
        return NULL;                                                                           \
    }
    INTERN(s_algorithm, "algorithm");
    INTERN(s_bucket, "bucket");
    INTERN(s_code, "code");
    INTERN(s_rate, "rate");
    INTERN(s_period_us, "period_us");
    INTERN(s_limit, "limit");
    INTERN(s_name, "name");
    INTERN(s_window, "window");
    INTERN(s_move_to_end, "move_to_end");
    INTERN(s_type, "type");
    INTERN(s_method, "method");
    INTERN(s_app, "app");
    INTERN(s_root_path, "root_path");
    INTERN(s_path, "path");
    INTERN(s_client, "client");
    INTERN(s_state, "state");
    INTERN(s_user, "user");
    INTERN(s_headers, "headers");
    INTERN(s_query_string, "query_string");
    INTERN(s_backend, "backend");
    INTERN(s_lists, "lists");
    INTERN(s_quiet, "quiet");
    INTERN(s_decisions, "decisions");
    INTERN(s_scope_key, "fastapi_ratelimit");
    INTERN(s_http, "http");
    INTERN(s_options, "OPTIONS");
    INTERN(s_empty, "");
    for (int i = 0; i < H_COUNT; i++) {
        if ((HEADER_BYTES[i] = PyBytes_FromString(HEADER_TEXT[i])) == NULL) {
            return NULL;
        }
    }
    INTERN(s_status, "status");
    INTERN(s_limiter, "limiter");
    INTERN(s_header_style, "header_style");
    INTERN(s_denial, "denial");
    INTERN(s_get, "get");
    INTERN(s_lower, "lower");
    INTERN(s_start_type, "http.response.start");
    INTERN(s_body_type, "http.response.body");
    INTERN(s_throw, "throw");
    INTERN(s_close, "close");
    INTERN(s_after_response, "after_response");
    INTERN(s_refundable, "refundable");
    INTERN(s_reported_cost, "reported_cost");
#undef INTERN
    if ((INT_429 = PyLong_FromLong(429)) == NULL || (FLOAT_ZERO = PyFloat_FromDouble(0.0)) == NULL ||
        PyType_Ready(&SenderType) < 0 || PyType_Ready(&LaneType) < 0 ||
        PyType_Ready(&LaneRunType) < 0) {
        return NULL;
    }
    PyObject *time_module = PyImport_ImportModule("time");
    if (time_module == NULL) {
        return NULL;
    }
    TIME_NS = PyObject_GetAttrString(time_module, "time_ns");
    Py_DECREF(time_module);
    if (TIME_NS == NULL) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "Sender", (PyObject *)&SenderType) < 0 ||
        PyModule_AddObjectRef(module, "Lane", (PyObject *)&LaneType) < 0 ||
        PyModule_AddObjectRef(module, "LaneRun", (PyObject *)&LaneRunType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
