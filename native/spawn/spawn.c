/*
 * posixSpawn(): starts a process with posix_spawn(3) and watches its exit
 * through a pidfd on Node's own event loop.
 *
 * Why: Node's child_process.spawn() forks the calling process, and a fork
 * costs the parent (page tables copied, every page written afterwards
 * faulted and copied) and the child (the same mappings torn down at exec)
 * in proportion to the parent's size. glibc's posix_spawn() runs the child
 * on the parent's memory until it execs (clone with CLONE_VM|CLONE_VFORK), so
 * a start costs the same whatever the parent's size. The spawner
 * (daemon/spawner-main.ts) is the only user; daemon/native-spawn.ts wraps
 * this in the part of ChildProcess that it uses.
 *
 * What the child gets is what Node's spawn(program, args, { cwd, env,
 * detached: true, stdio: "pipe" }) gives it: three Unix socket pairs as fds
 * 0–2 (libuv's "pipes") and no descriptor of the parent that Node's would
 * not pass (every end made here is close-on-exec),
 * a session (and process group) of its own (setsid), every signal's
 * disposition back to default and an empty signal mask (Node ignores
 * SIGPIPE, which exec would otherwise pass on), the working directory, and
 * the program looked up in the PATH of the environment it is given (as
 * libuv does), relative to that working directory. One difference is
 * glibc's: signals 32 and 33 (its own, for threads) start ignored, where
 * spawn() leaves them at default; glibc resets them in every program it
 * starts, so only a program without glibc could tell.
 *
 * The exit is taken with waitpid() once the pidfd is readable; libuv reaps
 * only the processes it started itself, so the pid stays this module's until
 * then (a zombie keeps its number: a signal to its group cannot reach a
 * stranger before this module has reported the exit).
 */
#include <errno.h>
#include <fcntl.h>
#include <node_api.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

/* Caps that keep a malformed request from asking for unbounded memory here (the spawner also caps its frames). */
#define MAX_STRINGS 65536

typedef struct {
  uv_poll_t poll;
  pid_t pid;
  int pidfd;
  napi_env env;
  napi_ref callback;
  napi_async_context context;
} watch_t;

static int pidfd_open(pid_t pid) { return (int)syscall(SYS_pidfd_open, pid, 0); }

/* Throws an Error whose code is the errno's name (ENOENT, …) and whose errno is negative, as Node's own. */
static napi_value throw_errno(napi_env env, int err, const char *what, const char *file) {
  char msg[512];
  const char *name = uv_err_name(-err);
  snprintf(msg, sizeof msg, "%s %s %s", what, file ? file : "", name);
  napi_value code, message, error, errnum, syscall_v;
  napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &code);
  napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &message);
  napi_create_error(env, code, message, &error);
  napi_create_int32(env, -err, &errnum);
  napi_set_named_property(env, error, "errno", errnum);
  napi_create_string_utf8(env, what, NAPI_AUTO_LENGTH, &syscall_v);
  napi_set_named_property(env, error, "syscall", syscall_v);
  napi_throw(env, error);
  return NULL;
}

static napi_value throw_type(napi_env env, const char *code, const char *msg) {
  napi_throw_type_error(env, code, msg);
  return NULL;
}

/* A JS string as a malloc'd C string; NULL (with a TypeError thrown) if it is not a string or holds a NUL byte. */
static char *get_string(napi_env env, napi_value value, const char *what) {
  size_t len;
  if (napi_get_value_string_utf8(env, value, NULL, 0, &len) != napi_ok) {
    char msg[128];
    snprintf(msg, sizeof msg, "%s must be a string", what);
    throw_type(env, "ERR_INVALID_ARG_TYPE", msg);
    return NULL;
  }
  char *s = malloc(len + 1);
  if (!s) {
    throw_type(env, "ERR_OUT_OF_MEMORY", "out of memory");
    return NULL;
  }
  napi_get_value_string_utf8(env, value, s, len + 1, &len);
  if (strlen(s) != len) {
    free(s);
    char msg[128];
    snprintf(msg, sizeof msg, "%s must not contain null bytes", what);
    throw_type(env, "ERR_INVALID_ARG_VALUE", msg);
    return NULL;
  }
  return s;
}

static void free_strings(char **list) {
  if (!list) return;
  for (char **p = list; *p; p++) free(*p);
  free(list);
}

/* A JS array of strings as a NULL-terminated list. */
static char **get_strings(napi_env env, napi_value array, const char *what) {
  bool is_array = false;
  uint32_t n = 0;
  if (napi_is_array(env, array, &is_array) != napi_ok || !is_array || napi_get_array_length(env, array, &n) != napi_ok || n > MAX_STRINGS) {
    char msg[128];
    snprintf(msg, sizeof msg, "%s must be an array of at most %d strings", what, MAX_STRINGS);
    throw_type(env, "ERR_INVALID_ARG_TYPE", msg);
    return NULL;
  }
  char **list = calloc((size_t)n + 1, sizeof(char *));
  if (!list) {
    throw_type(env, "ERR_OUT_OF_MEMORY", "out of memory");
    return NULL;
  }
  for (uint32_t i = 0; i < n; i++) {
    napi_value item;
    napi_get_element(env, array, i, &item);
    list[i] = get_string(env, item, what);
    if (!list[i]) {
      free_strings(list);
      return NULL;
    }
  }
  return list;
}

/*
 * The program to exec, as execvp would find it, with PATH taken from the
 * child's environment (default "/usr/bin:/bin", as libuv) and relative
 * names looked up from the child's working directory. Returns a malloc'd
 * path, or NULL with *err set (ENOENT, or EACCES when a match was not
 * executable). A name holding a slash is used as it is.
 */
static char *resolve(const char *file, char **envp, const char *cwd, int *err) {
  if (strchr(file, '/')) return strdup(file);
  const char *path = "/usr/bin:/bin";
  for (char **e = envp; *e; e++)
    if (strncmp(*e, "PATH=", 5) == 0) path = *e + 5;
  size_t flen = strlen(file), cwdlen = cwd ? strlen(cwd) : 0;
  int seen_eacces = 0;
  const char *p = path;
  for (;;) {
    const char *end = strchr(p, ':');
    size_t dlen = end ? (size_t)(end - p) : strlen(p);
    /* An empty entry is the working directory. */
    char *cand = malloc(dlen + flen + 3);
    char *check = malloc(cwdlen + dlen + flen + 4);
    if (!cand || !check) {
      free(cand);
      free(check);
      *err = ENOMEM;
      return NULL;
    }
    if (dlen == 0) sprintf(cand, "./%s", file);
    else sprintf(cand, "%.*s/%s", (int)dlen, p, file);
    if (cand[0] != '/' && cwd) sprintf(check, "%s/%s", cwd, cand);
    else strcpy(check, cand);
    struct stat st;
    if (stat(check, &st) == 0 && S_ISREG(st.st_mode)) {
      if (access(check, X_OK) == 0) {
        free(check);
        return cand;
      }
      seen_eacces = 1;
    }
    free(cand);
    free(check);
    if (!end) break;
    p = end + 1;
  }
  *err = seen_eacces ? EACCES : ENOENT;
  return NULL;
}

static void on_closed(uv_handle_t *handle) {
  watch_t *w = (watch_t *)handle;
  close(w->pidfd);
  free(w);
}

static void on_exit_ready(uv_poll_t *handle, int status, int events) {
  (void)events;
  watch_t *w = (watch_t *)handle;
  int wstatus = 0;
  pid_t got;
  do got = waitpid(w->pid, &wstatus, WNOHANG);
  while (got < 0 && errno == EINTR);
  if (got == 0 && status == 0) return; /* not yet */
  uv_poll_stop(&w->poll);
  napi_env env = w->env;
  napi_handle_scope scope;
  napi_open_handle_scope(env, &scope);
  napi_value cb, global, argv[2], result;
  napi_get_reference_value(env, w->callback, &cb);
  napi_get_global(env, &global);
  if (got == w->pid && WIFEXITED(wstatus)) {
    napi_create_int32(env, WEXITSTATUS(wstatus), &argv[0]);
    napi_get_null(env, &argv[1]);
  } else if (got == w->pid && WIFSIGNALED(wstatus)) {
    napi_get_null(env, &argv[0]);
    napi_create_int32(env, WTERMSIG(wstatus), &argv[1]);
  } else {
    /* Not ours to reap any more (ECHILD), or the poll failed: no exit status can be known. */
    napi_get_null(env, &argv[0]);
    napi_get_null(env, &argv[1]);
  }
  napi_make_callback(env, w->context, global, cb, 2, argv, &result);
  napi_delete_reference(env, w->callback);
  napi_async_destroy(env, w->context);
  napi_close_handle_scope(env, scope);
  uv_close((uv_handle_t *)&w->poll, on_closed);
}

/*
 * posixSpawn(file, args, env, cwd | null, onExit(code | null, signalNumber | null))
 *   → [pid, stdinFd, stdoutFd, stderrFd]
 * args[0] is the process's argv[0]. Throws an Error with the errno's code
 * (ENOENT, EACCES, …) when the process could not be started, a TypeError for
 * arguments it cannot pass (a NUL byte).
 */
static napi_value posix_spawn_js(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value args[5];
  napi_get_cb_info(env, info, &argc, args, NULL, NULL);
  if (argc < 5) return throw_type(env, "ERR_MISSING_ARGS", "posixSpawn(file, args, env, cwd, onExit)");
  napi_valuetype cb_type, cwd_type;
  napi_typeof(env, args[4], &cb_type);
  if (cb_type != napi_function) return throw_type(env, "ERR_INVALID_ARG_TYPE", "onExit must be a function");
  napi_typeof(env, args[3], &cwd_type);

  char *file = NULL, *cwd = NULL, *path = NULL;
  char **argv = NULL, **envp = NULL;
  int fds[6] = {-1, -1, -1, -1, -1, -1};
  napi_value ret = NULL;
  int err = 0;
  posix_spawn_file_actions_t actions;
  posix_spawnattr_t attr;
  int have_actions = 0, have_attr = 0;

  if (!(file = get_string(env, args[0], "file"))) goto done;
  if (!(argv = get_strings(env, args[1], "args"))) goto done;
  if (!argv[0]) {
    throw_type(env, "ERR_INVALID_ARG_VALUE", "args must hold at least argv[0]");
    goto done;
  }
  if (!(envp = get_strings(env, args[2], "env"))) goto done;
  if (cwd_type != napi_null && cwd_type != napi_undefined && !(cwd = get_string(env, args[3], "cwd"))) goto done;

  if (!(path = resolve(file, envp, cwd, &err))) {
    throw_errno(env, err, "spawn", file);
    goto done;
  }
  /* Socket pairs, as libuv makes for stdio "pipe": what a task sees (e.g. /dev/stdout cannot be opened) does not depend on which path started it. */
  for (int i = 0; i < 3; i++) {
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds + 2 * i) != 0) {
      throw_errno(env, errno, "socketpair", NULL);
      goto done;
    }
  }
  /* fds: [0]=stdin (child's end), [1]=stdin (ours), [2]=stdout (ours), [3]=stdout (child's), [4]/[5] stderr likewise. */
  if ((err = posix_spawn_file_actions_init(&actions)) != 0) goto spawn_error;
  have_actions = 1;
  if ((err = posix_spawn_file_actions_adddup2(&actions, fds[0], 0)) != 0 ||
      (err = posix_spawn_file_actions_adddup2(&actions, fds[3], 1)) != 0 ||
      (err = posix_spawn_file_actions_adddup2(&actions, fds[5], 2)) != 0)
    goto spawn_error;
  if (cwd && (err = posix_spawn_file_actions_addchdir_np(&actions, cwd)) != 0) goto spawn_error;
  if ((err = posix_spawnattr_init(&attr)) != 0) goto spawn_error;
  have_attr = 1;
  sigset_t all, none;
  sigfillset(&all);
  sigemptyset(&none);
  posix_spawnattr_setsigdefault(&attr, &all);
  posix_spawnattr_setsigmask(&attr, &none);
  if ((err = posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK)) != 0) goto spawn_error;
  pid_t pid;
  if ((err = posix_spawn(&pid, path, &actions, &attr, argv, envp)) != 0) goto spawn_error;

  /* The child's ends are the child's now. */
  close(fds[0]);
  close(fds[3]);
  close(fds[5]);
  fds[0] = fds[3] = fds[5] = -1;

  watch_t *w = calloc(1, sizeof(watch_t));
  int pidfd = w ? pidfd_open(pid) : -1;
  uv_loop_t *loop = NULL;
  if (pidfd < 0 || napi_get_uv_event_loop(env, &loop) != napi_ok || uv_poll_init(loop, &w->poll, pidfd) != 0) {
    /* Cannot watch it: end it rather than leave a process nobody reaps or reports. */
    int e = pidfd < 0 ? errno : EINVAL;
    kill(-pid, SIGKILL);
    waitpid(pid, NULL, 0);
    if (pidfd >= 0) close(pidfd);
    free(w);
    throw_errno(env, e, "pidfd_open", file);
    goto done;
  }
  w->pid = pid;
  w->pidfd = pidfd;
  w->env = env;
  napi_create_reference(env, args[4], 1, &w->callback);
  napi_value resource_name;
  napi_create_string_utf8(env, "rexmesh:posixSpawn", NAPI_AUTO_LENGTH, &resource_name);
  napi_async_init(env, NULL, resource_name, &w->context);
  uv_poll_start(&w->poll, UV_READABLE, on_exit_ready);

  napi_create_array_with_length(env, 4, &ret);
  int out[4] = {pid, fds[1], fds[2], fds[4]};
  for (int i = 0; i < 4; i++) {
    napi_value v;
    napi_create_int32(env, out[i], &v);
    napi_set_element(env, ret, i, v);
  }
  fds[1] = fds[2] = fds[4] = -1; /* handed to the caller */
  goto done;

spawn_error:
  throw_errno(env, err, "spawn", file);
done:
  for (int i = 0; i < 6; i++)
    if (fds[i] >= 0) close(fds[i]);
  if (have_actions) posix_spawn_file_actions_destroy(&actions);
  if (have_attr) posix_spawnattr_destroy(&attr);
  free(file);
  free(cwd);
  free(path);
  free_strings(argv);
  free_strings(envp);
  return ret;
}

NAPI_MODULE_INIT(/* napi_env env, napi_value exports */) {
  /* Without pidfds (Linux < 5.3) no exit can be watched: the module is not offered. */
  int probe = pidfd_open(getpid());
  if (probe < 0) return exports;
  close(probe);
  napi_value fn;
  napi_create_function(env, "posixSpawn", NAPI_AUTO_LENGTH, posix_spawn_js, NULL, &fn);
  napi_set_named_property(env, exports, "posixSpawn", fn);
  return exports;
}
