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
 * (daemon/spawner-main.ts) and the daemon's own launcher (daemon/launcher.ts)
 * use it through daemon/native-spawn.ts, which wraps this in the part of
 * ChildProcess that they use.
 *
 * What the child gets is what Node's spawn(program, args, { cwd, env,
 * detached: true, stdio: "pipe" }) gives it: three Unix socket pairs as fds
 * 0–2 (libuv's "pipes") and no other descriptor of the parent, not even
 * one left without close-on-exec (lmdb opens its data file so; Node's
 * spawn() passes such a descriptor on),
 * a session (and process group) of its own (setsid), every signal's
 * disposition back to default and an empty signal mask (Node ignores
 * SIGPIPE, which exec would otherwise pass on), the working directory, and
 * the program looked up as glibc's execvpe does (libuv ends in it), in the
 * PATH of the environment it is given, from that working directory, and a
 * file that is not a binary nor has a #! line run by /bin/sh. One difference is
 * glibc's: signals 32 and 33 (its own, for threads) start ignored, where
 * spawn() leaves them at default; glibc resets them in every program it
 * starts, so only a program without glibc could tell.
 *
 * The exit is taken with waitpid() once the pidfd is readable (or, should a
 * pidfd not be had, by a look every 100 ms); libuv reaps only the processes
 * it started itself, so the pid stays this module's until then (a zombie
 * keeps its number: a signal to its group cannot reach a stranger before
 * this module has reported the exit). A process is reaped only in the turn
 * that reports its exit.
 */
#include <errno.h>
#include <stdio.h>
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

/* Where no pidfd can be polled, the exit is looked for this often. */
#define REAP_POLL_MS 100

typedef struct {
  uv_poll_t poll;
  uv_timer_t timer;
  int poll_open, timer_open, closing;
  pid_t pid;
  int pidfd;
  napi_env env;
  napi_ref callback;
  napi_async_context context;
} watch_t;

static int pidfd_open(pid_t pid) { return (int)syscall(SYS_pidfd_open, pid, 0); }

static const char *errno_name(int err) {
  const char *name = strerrorname_np(err);
  return name ? name : "UNKNOWN";
}

/* Throws an Error whose code is the errno's name (ENOENT, …) and whose errno is negative, as Node's own. */
static napi_value throw_errno(napi_env env, int err, const char *what, const char *file) {
  char msg[512];
  const char *name = errno_name(err);
  snprintf(msg, sizeof msg, "%s%s%s %s", what, file ? " " : "", file ? file : "", name);
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
  char msg[128];
  if (napi_get_value_string_utf8(env, value, NULL, 0, &len) != napi_ok) {
    snprintf(msg, sizeof msg, "%s must be a string", what);
    throw_type(env, "ERR_INVALID_ARG_TYPE", msg);
    return NULL;
  }
  char *s = malloc(len + 1);
  if (!s) {
    throw_errno(env, ENOMEM, "spawn", NULL);
    return NULL;
  }
  napi_get_value_string_utf8(env, value, s, len + 1, &len);
  if (strlen(s) != len) {
    free(s);
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

/* A JS array of strings as a NULL-terminated list (no count cap: the kernel's E2BIG bounds what exec takes). */
static char **get_strings(napi_env env, napi_value array, const char *what) {
  bool is_array = false;
  uint32_t n = 0;
  if (napi_is_array(env, array, &is_array) != napi_ok || !is_array || napi_get_array_length(env, array, &n) != napi_ok) {
    char msg[128];
    snprintf(msg, sizeof msg, "%s must be an array of strings", what);
    throw_type(env, "ERR_INVALID_ARG_TYPE", msg);
    return NULL;
  }
  char **list = calloc((size_t)n + 1, sizeof(char *));
  if (!list) {
    throw_errno(env, ENOMEM, "spawn", NULL);
    return NULL;
  }
  for (uint32_t i = 0; i < n; i++) {
    napi_value item;
    if (napi_get_element(env, array, i, &item) != napi_ok || !(list[i] = get_string(env, item, what))) {
      free_strings(list);
      return NULL;
    }
  }
  return list;
}

/* posix_spawn of one path; a file exec refuses (ENOEXEC: no ELF, no #!) runs as a /bin/sh script, as execvp does. */
static int spawn_path(pid_t *pid, const char *path, char **argv, char **envp, const posix_spawn_file_actions_t *actions, const posix_spawnattr_t *attr) {
  int err = posix_spawn(pid, path, actions, attr, argv, envp);
  if (err != ENOEXEC) return err;
  size_t argc = 0;
  while (argv[argc]) argc++;
  char **sh = calloc(argc + 2, sizeof(char *));
  if (!sh) return ENOMEM;
  sh[0] = "/bin/sh";
  sh[1] = (char *)path;
  for (size_t i = 1; i < argc; i++) sh[i + 1] = argv[i];
  err = posix_spawn(pid, "/bin/sh", actions, attr, sh, envp);
  free(sh);
  return err;
}

/* stat() of a path as the child sees it: a relative one from its working directory. */
static int stat_from(const char *cwd, const char *path, struct stat *st) {
  if (path[0] == '/' || !cwd) return stat(path, st);
  size_t clen = strlen(cwd), plen = strlen(path);
  char *full = malloc(clen + plen + 2);
  if (!full) {
    errno = ENOMEM;
    return -1;
  }
  memcpy(full, cwd, clen);
  full[clen] = '/';
  memcpy(full + clen + 1, path, plen + 1);
  int r = stat(full, st);
  int saved = errno;
  free(full);
  errno = saved;
  return r;
}

/*
 * Starts `file` as glibc's execvpe would find it: a name holding a slash as
 * it is; otherwise each entry of the child's PATH (default "/bin:/usr/bin",
 * glibc's) in turn, an empty entry meaning the working directory, going on
 * past ENOENT, ENOTDIR, ESTALE, ENODEV, ETIMEDOUT and EACCES (which is then
 * the error if nothing starts) and an entry too long to be a path, and
 * stopping at any other. Relative paths are
 * the child's, from its working directory (the chdir comes first).
 */
static int spawn_search(pid_t *pid, const char *file, const char *cwd, char **argv, char **envp, const posix_spawn_file_actions_t *actions, const posix_spawnattr_t *attr) {
  if (strchr(file, '/')) return spawn_path(pid, file, argv, envp, actions, attr);
  const char *path = "/bin:/usr/bin";
  for (char **e = envp; *e; e++)
    if (strncmp(*e, "PATH=", 5) == 0) {
      path = *e + 5; /* the first, as getenv */
      break;
    }
  size_t flen = strlen(file);
  int err = ENOENT, seen_eacces = 0;
  for (const char *p = path;;) {
    const char *end = strchrnul(p, ':');
    size_t dlen = (size_t)(end - p);
    char *cand = malloc(dlen + flen + 2);
    if (!cand) return ENOMEM;
    if (dlen == 0) memcpy(cand, file, flen + 1);
    else {
      memcpy(cand, p, dlen);
      cand[dlen] = '/';
      memcpy(cand + dlen + 1, file, flen + 1);
    }
    /* A candidate that is not there is passed over without a process made for it (exec would say the same). */
    struct stat st;
    if (stat_from(cwd, cand, &st) != 0 && (errno == ENOENT || errno == ENOTDIR || errno == ENAMETOOLONG)) err = errno == ENAMETOOLONG ? ENOENT : errno;
    else err = spawn_path(pid, cand, argv, envp, actions, attr);
    free(cand);
    if (err == 0) return 0;
    if (err == EACCES) seen_eacces = 1;
    else if (err != ENOENT && err != ENOTDIR && err != ESTALE && err != ENODEV && err != ETIMEDOUT) return err;
    if (*end == '\0') break;
    p = end + 1;
  }
  return seen_eacces ? EACCES : err;
}

static void on_closed(uv_handle_t *handle) {
  watch_t *w = handle->data;
  if (--w->closing > 0) return;
  if (w->pidfd >= 0) close(w->pidfd);
  free(w);
}

/* Reports the exit to JS (in the turn that reaped it), then lets the watch go. */
static void report(watch_t *w, pid_t got, int wstatus) {
  napi_env env = w->env;
  if (w->poll_open) uv_poll_stop(&w->poll);
  if (w->timer_open) uv_timer_stop(&w->timer);
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
    /* ECHILD: not ours to reap (cannot happen unless something else reaped it): no status can be known. */
    napi_get_null(env, &argv[0]);
    napi_get_null(env, &argv[1]);
  }
  if (napi_make_callback(env, w->context, global, cb, 2, argv, &result) == napi_pending_exception) {
    /* A throw in the exit handler is the process's uncaught exception, not something left pending for the next call. */
    napi_value err;
    napi_get_and_clear_last_exception(env, &err);
    napi_fatal_exception(env, err);
  }
  napi_delete_reference(env, w->callback);
  napi_async_destroy(env, w->context);
  napi_close_handle_scope(env, scope);
  w->closing = w->poll_open + w->timer_open;
  if (w->poll_open) uv_close((uv_handle_t *)&w->poll, on_closed);
  if (w->timer_open) uv_close((uv_handle_t *)&w->timer, on_closed);
}

/* Reaps and reports the exit if there is one: 1; not yet: 0. */
static int check(watch_t *w) {
  int wstatus = 0;
  pid_t got;
  do got = waitpid(w->pid, &wstatus, WNOHANG);
  while (got < 0 && errno == EINTR);
  if (got == 0) return 0;
  report(w, got, wstatus);
  return 1;
}

static void on_timer(uv_timer_t *handle) { (void)check(handle->data); }

/* Looks for the exit every REAP_POLL_MS instead of through the pidfd. Returns 0, or a libuv error. */
static int watch_by_timer(uv_loop_t *loop, watch_t *w) {
  if (!w->timer_open) {
    int err = uv_timer_init(loop, &w->timer);
    if (err) return err;
    w->timer.data = w;
    w->timer_open = 1;
  }
  return uv_timer_start(&w->timer, on_timer, REAP_POLL_MS, REAP_POLL_MS);
}

static void on_pidfd(uv_poll_t *handle, int status, int events) {
  (void)events;
  watch_t *w = handle->data;
  if (status == 0 && check(w)) return;
  /*
   * The pidfd cannot be polled (not expected), or it is readable but the
   * process cannot be reaped yet (a tracer has not waited for it): the poll,
   * level-triggered, would fire every turn. Look by time instead; never
   * report an exit not seen.
   */
  uv_poll_stop(&w->poll);
  if (watch_by_timer(handle->loop, w) != 0) (void)check(w);
}

/*
 * posixSpawn(file, args, env, cwd | null, onExit(code | null, signalNumber | null))
 *   → [pid, stdinFd, stdoutFd, stderrFd]
 * args[0] is the process's argv[0]. Throws an Error with the errno's code
 * (ENOENT, EACCES, ENOTDIR, …) when the process could not be started, a
 * TypeError for arguments it cannot pass (a NUL byte). onExit is called
 * once, in the turn that reaped the process.
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

  char *file = NULL, *cwd = NULL;
  char **argv = NULL, **envp = NULL;
  int fds[6] = {-1, -1, -1, -1, -1, -1};
  napi_value ret = NULL;
  int err = 0;
  posix_spawn_file_actions_t actions;
  posix_spawnattr_t attr;
  int have_actions = 0, have_attr = 0;
  watch_t *w = NULL;
  uv_loop_t *loop = NULL;

  if (!(file = get_string(env, args[0], "file"))) goto done;
  if (!(argv = get_strings(env, args[1], "args"))) goto done;
  if (!argv[0]) {
    throw_type(env, "ERR_INVALID_ARG_VALUE", "args must hold at least argv[0]");
    goto done;
  }
  if (!(envp = get_strings(env, args[2], "env"))) goto done;
  if (cwd_type != napi_null && cwd_type != napi_undefined && !(cwd = get_string(env, args[3], "cwd"))) goto done;
  /* Everything the watch needs is had before a process exists, so that a started process is always watched. */
  if (!(w = calloc(1, sizeof(watch_t)))) {
    throw_errno(env, ENOMEM, "spawn", file);
    goto done;
  }
  w->pidfd = -1;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok) {
    throw_errno(env, EINVAL, "spawn", file);
    goto done;
  }
  /* The working directory first, as libuv's child does chdir before its exec: its error is the spawn's. */
  if (cwd) {
    struct stat st;
    if (stat(cwd, &st) != 0) err = errno;
    else if (!S_ISDIR(st.st_mode)) err = ENOTDIR;
    if (err) goto spawn_error;
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
  /* Nothing of this process past 0–2 reaches the child, close-on-exec or not (glibc 2.34 and later). */
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 34))
  if ((err = posix_spawn_file_actions_addclosefrom_np(&actions, 3)) != 0) goto spawn_error;
#endif
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
  if ((err = spawn_search(&pid, file, cwd, argv, envp, &actions, &attr)) != 0) goto spawn_error;

  /* The child's ends are the child's now. */
  close(fds[0]);
  close(fds[3]);
  close(fds[5]);
  fds[0] = fds[3] = fds[5] = -1;

  w->pid = pid;
  w->env = env;
  w->poll.data = w;
  napi_create_reference(env, args[4], 1, &w->callback);
  napi_value resource_name;
  napi_create_string_utf8(env, "rexmesh:posixSpawn", NAPI_AUTO_LENGTH, &resource_name);
  napi_async_init(env, NULL, resource_name, &w->context);
  /* A pidfd polled on the loop; without one (EMFILE, …), a look by time. Either way the process is watched until reaped. */
  w->pidfd = pidfd_open(pid);
  if (w->pidfd >= 0 && uv_poll_init(loop, &w->poll, w->pidfd) == 0) {
    w->poll_open = 1;
    if (uv_poll_start(&w->poll, UV_READABLE, on_pidfd) != 0) watch_by_timer(loop, w);
  } else {
    watch_by_timer(loop, w);
  }
  w = NULL; /* the watch's now */

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
  free(w);
  free(file);
  free(cwd);
  free_strings(argv);
  free_strings(envp);
  return ret;
}

NAPI_MODULE_INIT(/* napi_env env, napi_value exports */) {
  /* Without pidfds (Linux < 5.3) the module is not offered (a timer alone would see exits up to 100 ms late). */
  int probe = pidfd_open(getpid());
  if (probe < 0) return exports;
  close(probe);
  napi_value fn;
  napi_create_function(env, "posixSpawn", NAPI_AUTO_LENGTH, posix_spawn_js, NULL, &fn);
  napi_set_named_property(env, exports, "posixSpawn", fn);
  return exports;
}
