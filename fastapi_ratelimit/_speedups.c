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
 * `MemoryBackend._admit_all_py` and rate_limit_headers is `headers.rate_limit_headers_py`.
 * Tests hold each pair to the same answers. Where a value falls outside what C can mirror
 * exactly (an integer past 2**53, a state of an unexpected shape, a plain-string header
 * style), these functions answer "don't know" (None) before changing anything, and the
 * Python path decides.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>

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
 * Verdict, Py_None (a new reference) for "don't know" before anything changed, or NULL with
 * an exception. New entries are appended to `fresh` as (key, [expires, state]). */
static PyObject *
admit_levels(Level *levels, Py_ssize_t n, long long now, PyObject *data, long long margin,
             PyObject *fresh)
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
    /* The same key twice: the general path raises the error for it. */
    for (Py_ssize_t i = 1; i < n; i++) {
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
    PyObject *decisions = PyTuple_New(n);
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
            PyObject *moved = PyObject_CallMethodOneArg(data, s_move_to_end, level->key);
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
        PyTuple_SET_ITEM(decisions, i, decision);
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
    result = admit_levels(levels, n, now, data, margin, fresh);
done:
    release_levels(levels, filled);
    Py_DECREF(checks);
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
static PyObject *STYLES[STYLE_COUNT];  /* the HeaderStyle members */

static PyObject *
configure_headers(PyObject *module, PyObject *args)
{
    PyObject *policy_header, *name_bytes, *policy_fields, *styles;
    if (!PyArg_ParseTuple(args, "OOOO!", &policy_header, &name_bytes, &policy_fields,
                          &PyTuple_Type, &styles)) {
        return NULL;
    }
    if (PyTuple_GET_SIZE(styles) != STYLE_COUNT) {
        PyErr_SetString(PyExc_ValueError, "configure_headers: five styles");
        return NULL;
    }
    Py_XSETREF(POLICY_HEADER, Py_NewRef(policy_header));
    Py_XSETREF(NAME_BYTES, Py_NewRef(name_bytes));
    Py_XSETREF(POLICY_FIELDS, Py_NewRef(policy_fields));
    for (int i = 0; i < STYLE_COUNT; i++) {
        Py_XSETREF(STYLES[i], Py_NewRef(PyTuple_GET_ITEM(styles, i)));
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

/* headers.rate_limit_headers_py in C for a style code other than "none". Returns a new list,
 * Py_None (a new reference) for what C leaves to Python, or NULL with an exception. */
static PyObject *
build_headers(PyObject *seq, int style, PyObject *now_obj)
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
        PyObject *policy = PyObject_CallOneArg(POLICY_HEADER, key);
        Py_DECREF(key);
        if (append_header(result, H_RATELIMIT_POLICY, policy) < 0) {
            goto error;
        }
        /* The binding policy's name as bytes. */
        PyObject *name = PyObject_CallOneArg(NAME_BYTES, PyTuple_GET_ITEM(bound, D_POLICY));
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
        int ok = number(now_obj, &now);
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
    return build_headers(args[0], style_code(args[1]), args[2]);
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(sliding_window_counter, Decision, Verdict): the types admit_sc works with."},
    {"admit_sc", (PyCFunction)(void (*)(void))admit_sc, METH_FASTCALL,
     "admit_sc(checks, now, data, cached, key_fn, margin, fresh) -> Verdict | None"},
    {"rate_limit_headers", (PyCFunction)(void (*)(void))rate_limit_headers, METH_FASTCALL,
     "rate_limit_headers(decisions, style, now) -> list | None"},
    {"configure_headers", configure_headers, METH_VARARGS,
     "configure_headers(policy_header, name_bytes, policy_fields, styles): the helpers and "
     "constants of fastapi_ratelimit.headers."},
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
#undef INTERN
    for (int i = 0; i < H_COUNT; i++) {
        if ((HEADER_BYTES[i] = PyBytes_FromString(HEADER_TEXT[i])) == NULL) {
            return NULL;
        }
    }
    if ((FLOAT_ZERO = PyFloat_FromDouble(0.0)) == NULL) {
        return NULL;
    }
    return PyModule_Create(&module_def);
}
