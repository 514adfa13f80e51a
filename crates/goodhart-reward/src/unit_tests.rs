//! `unit_tests`: the fraction of a response program's unit tests that pass, each test
//! run in a sandboxed subprocess (Python).
//!
//! The program is the last fenced code block of the response (```` ```python ```` or
//! plain ```` ``` ````), else the whole response. The tests are the reference answer: a
//! JSON list of Python snippets, or one snippet per non-empty line (MBPP's `assert`
//! lines). A harness runs the program then each test in one interpreter (`python -I`,
//! isolated mode) and reports every test's outcome; an exception, `SystemExit`
//! included, fails the test with its type and message as the reason. A program that
//! does not run fails every test.
//!
//! **The sandbox** (Linux): a fresh user, mount and network namespace per program; every
//! mount read-only (`mount_setattr`, recursive) but the program's scratch directory, a
//! new one per program and removed after; no network device but a down loopback, so
//! nothing can be reached; resource limits on CPU time, address space (memory), file
//! size and open files; a `seccomp` filter under `no_new_privs` that refuses what would
//! undo the sandbox (mounts, namespaces, `chroot`) and, unless `processes = true`, new
//! processes (`fork` fails with `EAGAIN`; threads are allowed); a wall-clock limit, after
//! which the program's process group is killed; stdout and stderr capped. The program
//! can read the host's files (read-only), as the user running goodhart. When the
//! namespaces cannot be created (a kernel or container that forbids user namespaces)
//! programs are refused unless `allow_unsandboxed = true`, which runs them with the
//! resource limits and the filter alone.
//!
//! The harness runs in the program's interpreter: a program that inspects it could forge
//! its results. Unit tests are a proxy too.

use std::{
    ffi::CString,
    io::Read,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use burn::tensor::backend::Backend;
use goodhart_core::{GoodhartError, Result};
use serde::{Deserialize, Serialize};

use crate::{
    source::{RewardOutput, RewardSource},
    text::Texts,
};

/// `kind = "unit_tests"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UnitTestsConfig {
    /// The Python interpreter (a name on `PATH` or a path).
    pub python: String,
    /// Wall-clock seconds per program.
    pub timeout_s: f64,
    /// CPU seconds per program (`RLIMIT_CPU`).
    pub cpu_s: u64,
    /// Address space per process in MiB (`RLIMIT_AS`).
    pub memory_mb: u64,
    /// Let programs start processes (`fork`, `vfork`, `clone` without `CLONE_THREAD`);
    /// off, they fail with `EAGAIN` (threads are allowed either way).
    pub processes: bool,
    /// Bytes of stdout and of stderr kept per program; more is discarded.
    pub max_output_bytes: usize,
    /// Largest file the program may write (`RLIMIT_FSIZE`), in bytes.
    pub max_file_bytes: u64,
    /// Programs run at once.
    pub workers: usize,
    /// Run programs with the resource limits alone where the sandbox's namespaces
    /// cannot be created (never silently).
    pub allow_unsandboxed: bool,
}

impl Default for UnitTestsConfig {
    fn default() -> Self {
        Self {
            python: "python3".into(),
            timeout_s: 10.0,
            cpu_s: 10,
            memory_mb: 1024,
            processes: false,
            max_output_bytes: 1 << 16,
            max_file_bytes: 1 << 20,
            workers: 4,
            allow_unsandboxed: false,
        }
    }
}

impl UnitTestsConfig {
    /// Errors on a limit that is zero or not finite.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("cpu_s", self.cpu_s),
            ("memory_mb", self.memory_mb),
            ("max_output_bytes", self.max_output_bytes as u64),
            ("max_file_bytes", self.max_file_bytes),
            ("workers", self.workers as u64),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(GoodhartError::invalid(*key, "must be at least 1"));
        }
        if !(self.timeout_s.is_finite() && self.timeout_s > 0.0) {
            return Err(GoodhartError::invalid(
                "timeout_s",
                format!("must be finite and > 0, got {}", self.timeout_s),
            ));
        }
        if self.python.is_empty() {
            return Err(GoodhartError::invalid("python", "is empty"));
        }
        Ok(())
    }
}

/// How a program's run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    /// It exited with this code.
    Exited(i32),
    /// Killed after the wall-clock limit.
    Timeout,
    /// Ended by this signal (`SIGXCPU` / `SIGKILL` at the CPU limit, ...).
    Signal(i32),
}

/// One test's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestResult {
    /// Whether it passed.
    pub passed: bool,
    /// Why it failed (empty when it passed).
    pub reason: String,
}

/// One program's run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Every test's outcome, in order.
    pub tests: Vec<TestResult>,
    /// How the run ended.
    pub ending: Ending,
    /// Whether it ran in the sandbox (false only with `allow_unsandboxed`).
    pub sandboxed: bool,
    /// Its stderr (capped).
    pub stderr: String,
    /// Whether stdout or stderr went over `max_output_bytes`.
    pub truncated: bool,
    /// Wall-clock seconds.
    pub seconds: f64,
}

impl Report {
    /// The fraction of tests passed (0 with no test).
    pub fn score(&self) -> f64 {
        if self.tests.is_empty() {
            return 0.0;
        }
        self.tests.iter().filter(|t| t.passed).count() as f64 / self.tests.len() as f64
    }
}

/// The program of a response: its last fenced code block, else all of it.
pub fn program_of(response: &str) -> String {
    let mut last = None;
    let mut rest = response;
    while let Some(open) = rest.find("```") {
        let after = &rest[open + 3..];
        let body_start = after.find('\n').map_or(after.len(), |i| i + 1);
        let Some(close) = after[body_start..].find("```") else {
            break;
        };
        last = Some(after[body_start..body_start + close].to_string());
        rest = &after[body_start + close + 3..];
    }
    last.unwrap_or_else(|| response.to_string())
}

/// The tests of a reference: a JSON list of snippets, or its non-empty lines.
pub fn tests_of(reference: &str) -> Vec<String> {
    if let Ok(list) = serde_json::from_str::<Vec<String>>(reference) {
        return list;
    }
    reference
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

const HARNESS: &str = r#"import json, os, sys
nonce = os.environ.pop("GOODHART_NONCE")
out = os.fdopen(3, "w")
def report(i, ok, why):
    out.write(nonce + " " + json.dumps([i, ok, why]) + "\n")
    out.flush()
tests = json.load(open("tests.json"))
scope = {"__name__": "__main__"}
try:
    exec(compile(open("program.py").read(), "program.py", "exec"), scope)
except BaseException as e:
    for i in range(len(tests)):
        report(i, False, ("program: %s: %s" % (type(e).__name__, e))[:300])
    os._exit(0)
for i, t in enumerate(tests):
    try:
        exec(compile(t, "test %d" % i, "exec"), scope)
        report(i, True, "")
    except BaseException as e:
        report(i, False, ("%s: %s" % (type(e).__name__, e))[:300])
os._exit(0)
"#;

/// Bytes of harness reports read per program (a few hundred per test).
const REPORT_CAP: usize = 1 << 22;

/// Runs Python programs against their tests (see the module docs).
#[derive(Debug, Clone)]
pub struct Sandbox {
    config: UnitTestsConfig,
    python: PathBuf,
    sandboxed: bool,
    root: PathBuf,
}

/// Bytes of `reader` up to `cap`, the rest read and dropped; whether any was dropped.
fn capped(mut reader: impl Read, cap: usize) -> (Vec<u8>, bool) {
    let (mut kept, mut buf, mut over) = (Vec::new(), [0u8; 8192], false);
    while let Ok(n) = reader.read(&mut buf) {
        if n == 0 {
            break;
        }
        let room = cap.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
        over |= n > room;
    }
    (kept, over)
}

impl Sandbox {
    /// Finds the interpreter and checks that the sandbox can be made (running one empty
    /// program in it). Errors on an invalid config, an interpreter that does not run, or
    /// no sandbox without `allow_unsandboxed`.
    pub fn new(config: UnitTestsConfig) -> Result<Self> {
        config.validate()?;
        let out = Command::new(&config.python)
            .args(["-I", "-c", "import sys; print(sys.executable)"])
            .output()
            .map_err(|e| GoodhartError::invalid("python", format!("`{}`: {e}", config.python)))?;
        let python = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if !out.status.success() || !python.is_absolute() {
            return Err(GoodhartError::invalid(
                "python",
                format!("`{}` does not run Python", config.python),
            ));
        }
        static SANDBOXES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SANDBOXES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let root =
            std::env::temp_dir().join(format!("goodhart-unit-tests-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&root).map_err(|e| {
            GoodhartError::invalid("unit_tests", format!("{}: {e}", root.display()))
        })?;
        let mut sandbox = Self {
            config,
            python,
            sandboxed: true,
            root,
        };
        // One empty program in the sandbox; where the namespaces cannot be made, the
        // child fails before exec (an error) or the harness never runs.
        let why = match sandbox.run("", &["assert True".into()]) {
            Ok(probe) if probe.score() == 1.0 => return Ok(sandbox),
            Ok(probe) => format!("{:?}: {}", probe.ending, probe.stderr.trim()),
            Err(e) => e.to_string(),
        };
        if !sandbox.config.allow_unsandboxed {
            return Err(GoodhartError::invalid(
                "unit_tests",
                format!(
                    "the sandbox cannot be made here ({why}); set allow_unsandboxed = true to \
                     run programs with resource limits alone"
                ),
            ));
        }
        sandbox.sandboxed = false;
        let probe = sandbox.run("", &["assert True".into()])?;
        if probe.score() != 1.0 {
            return Err(GoodhartError::invalid(
                "unit_tests",
                format!(
                    "programs do not run even without the sandbox: {}",
                    probe.stderr.trim()
                ),
            ));
        }
        Ok(sandbox)
    }

    /// Whether programs run in the namespaces (false: resource limits alone).
    pub fn sandboxed(&self) -> bool {
        self.sandboxed
    }

    /// Runs `program` against `tests` in a fresh scratch directory.
    pub fn run(&self, program: &str, tests: &[String]) -> Result<Report> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = self.root.join(format!("p{id}"));
        let io = |e: std::io::Error| {
            GoodhartError::invalid("unit_tests", format!("{}: {e}", dir.display()))
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        std::fs::write(dir.join("program.py"), program).map_err(io)?;
        std::fs::write(
            dir.join("tests.json"),
            serde_json::to_string(tests).expect("strings serialise"),
        )
        .map_err(io)?;
        std::fs::write(dir.join("harness.py"), HARNESS).map_err(io)?;
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let nonce = format!("@goodhart-{}-{id}-{clock:x}", std::process::id());
        let report = self.spawn(&dir, &nonce, tests.len());
        let _ = std::fs::remove_dir_all(&dir);
        report
    }

    fn spawn(&self, dir: &Path, nonce: &str, n_tests: usize) -> Result<Report> {
        let c = &self.config;
        let mut cmd = Command::new(&self.python);
        cmd.args(["-I", "-B", "harness.py"])
            .current_dir(dir)
            .env_clear()
            .env("GOODHART_NONCE", nonce)
            .env("HOME", dir)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let limits = [
            (libc::RLIMIT_CPU, c.cpu_s),
            (libc::RLIMIT_AS, c.memory_mb << 20),
            (libc::RLIMIT_FSIZE, c.max_file_bytes),
            (libc::RLIMIT_NOFILE, 64),
            (libc::RLIMIT_CORE, 0),
        ];
        let filter = seccomp_filter(!c.processes);
        let jail = self.sandboxed.then(|| Jail::new(dir)).transpose()?;
        // The harness reports on fd 3, apart from the program's own output.
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two descriptors into `fds`.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(GoodhartError::invalid(
                "unit_tests",
                format!("pipe: {}", std::io::Error::last_os_error()),
            ));
        }
        let (report_read, report_write) = (fds[0], fds[1]);
        // SAFETY: the closure runs in the child between fork and exec; it only makes
        // system calls on data prepared before the fork (no allocation, no locks).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setpgid(0, 0) != 0 || libc::dup2(report_write, 3) != 3 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(jail) = &jail {
                    jail.enter()?;
                }
                for (resource, value) in limits {
                    let lim = libc::rlimit {
                        rlim_cur: value,
                        rlim_max: value,
                    };
                    if libc::setrlimit(resource, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // Last: no new privileges, and the system-call filter.
                let fprog = libc::sock_fprog {
                    len: filter.len() as u16,
                    filter: filter.as_ptr() as *mut libc::sock_filter,
                };
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                    || libc::prctl(
                        libc::PR_SET_SECCOMP,
                        libc::SECCOMP_MODE_FILTER,
                        &fprog as *const libc::sock_fprog,
                    ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let t0 = Instant::now();
        let spawned = cmd.spawn();
        // SAFETY: the parent's copy of the write end is closed once, here; the read end
        // is owned by the File below.
        let report_pipe = unsafe {
            libc::close(report_write);
            <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(report_read)
        };
        let mut child = spawned.map_err(|e| {
            GoodhartError::invalid("unit_tests", format!("cannot start the program: {e}"))
        })?;
        let pgid = child.id() as i32;
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let cap = c.max_output_bytes;
        let (status, (_, out_over), (err, err_over), (reports, _)) = std::thread::scope(|s| {
            let out = s.spawn(move || stdout.map_or((Vec::new(), false), |r| capped(r, cap)));
            let err = s.spawn(move || stderr.map_or((Vec::new(), false), |r| capped(r, cap)));
            let rep = s.spawn(move || capped(report_pipe, REPORT_CAP));
            let deadline = t0 + Duration::from_secs_f64(c.timeout_s);
            let status = loop {
                match child.try_wait() {
                    Ok(Some(status)) => break Some(status),
                    Ok(None) if Instant::now() >= deadline => break None,
                    Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                    Err(_) => break None,
                }
            };
            // The whole process group goes: the program's own children too.
            // SAFETY: kill takes plain integers.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
            if status.is_none() {
                let _ = child.wait();
            }
            (
                status,
                out.join().unwrap_or_default(),
                err.join().unwrap_or_default(),
                rep.join().unwrap_or_default(),
            )
        });
        let seconds = t0.elapsed().as_secs_f64();
        let ending = match status {
            None => Ending::Timeout,
            Some(s) => {
                use std::os::unix::process::ExitStatusExt;
                match (s.code(), s.signal()) {
                    (Some(code), _) => Ending::Exited(code),
                    (None, Some(sig)) => Ending::Signal(sig),
                    _ => Ending::Exited(-1),
                }
            }
        };
        let mut tests: Vec<Option<TestResult>> = vec![None; n_tests];
        for line in String::from_utf8_lossy(&reports).lines() {
            let Some(body) = line.strip_prefix(nonce).map(str::trim) else {
                continue;
            };
            if let Ok((i, passed, reason)) = serde_json::from_str::<(usize, bool, String)>(body) {
                if i < n_tests && tests[i].is_none() {
                    tests[i] = Some(TestResult { passed, reason });
                }
            }
        }
        let missing = match &ending {
            Ending::Timeout => format!("killed after the wall-clock limit of {} s", c.timeout_s),
            Ending::Signal(sig @ (libc::SIGXCPU | libc::SIGKILL)) => {
                format!(
                    "killed (signal {sig}) at a resource limit (CPU {} s)",
                    c.cpu_s
                )
            }
            Ending::Signal(sig) => format!("killed by signal {sig}"),
            Ending::Exited(code) => format!("the interpreter exited ({code}) before the test ran"),
        };
        Ok(Report {
            tests: tests
                .into_iter()
                .map(|t| {
                    t.unwrap_or(TestResult {
                        passed: false,
                        reason: missing.clone(),
                    })
                })
                .collect(),
            ending,
            sandboxed: self.sandboxed,
            stderr: String::from_utf8_lossy(&err).into_owned(),
            truncated: out_over || err_over,
            seconds,
        })
    }

    /// Runs every `(program, tests)` on `workers` threads; reports in order.
    pub fn run_all(&self, jobs: &[(String, Vec<String>)]) -> Result<Vec<Report>> {
        crate::workers::map(self.config.workers, jobs.len(), |i| {
            self.run(&jobs[i].0, &jobs[i].1)
        })
        .into_iter()
        .collect()
    }
}

/// The `seccomp` filter every program runs under: what would undo the sandbox (mounts,
/// namespaces, `chroot`) fails with `EPERM`; with `no_processes`, `fork`, `vfork` and
/// `clone` without `CLONE_THREAD` fail with `EAGAIN` and `clone3` with `ENOSYS` (so the
/// C library makes threads with `clone`). Another architecture's system calls are killed.
fn seccomp_filter(no_processes: bool) -> Vec<libc::sock_filter> {
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    #[cfg(target_arch = "x86_64")]
    const ARCH: u32 = 0xC000_003E;
    #[cfg(target_arch = "aarch64")]
    const ARCH: u32 = 0xC000_00B7;
    let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    let errno = |e: i32| libc::SECCOMP_RET_ERRNO | e as u32;
    let mut denied: Vec<(libc::c_long, i32)> = [
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_mount_setattr,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_unshare,
        libc::SYS_setns,
    ]
    .iter()
    .map(|&nr| (nr, libc::EPERM))
    .collect();
    if no_processes {
        denied.push((libc::SYS_clone3, libc::ENOSYS));
        #[cfg(target_arch = "x86_64")]
        denied.extend([
            (libc::SYS_fork, libc::EAGAIN),
            (libc::SYS_vfork, libc::EAGAIN),
        ]);
    }
    let mut prog = vec![
        op(LD_W_ABS, 0, 0, 4), // arch
        op(JEQ_K, 1, 0, ARCH),
        op(RET_K, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
        op(LD_W_ABS, 0, 0, 0), // nr
    ];
    for (nr, e) in denied {
        prog.push(op(JEQ_K, 0, 1, nr as u32));
        prog.push(op(RET_K, 0, 0, errno(e)));
    }
    if no_processes {
        // clone: allowed for threads only (flags are its first argument).
        prog.push(op(JEQ_K, 0, 3, libc::SYS_clone as u32));
        prog.push(op(LD_W_ABS, 0, 0, 16)); // args[0], low word
        prog.push(op(JSET_K, 1, 0, libc::CLONE_THREAD as u32));
        prog.push(op(RET_K, 0, 0, errno(libc::EAGAIN)));
    }
    prog.push(op(RET_K, 0, 0, libc::SECCOMP_RET_ALLOW));
    prog
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// What the child needs to enter its namespaces, prepared before the fork.
struct Jail {
    scratch: CString,
    root: CString,
    uid_map: Vec<u8>,
    gid_map: Vec<u8>,
}

/// `struct mount_attr` of `mount_setattr(2)`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const AT_RECURSIVE: libc::c_uint = 0x8000;

impl Jail {
    fn new(scratch: &Path) -> Result<Self> {
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: getuid / getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Ok(Self {
            scratch: CString::new(scratch.as_os_str().as_bytes())
                .map_err(|_| GoodhartError::invalid("unit_tests", "a scratch path with a NUL"))?,
            root: CString::new("/").expect("no NUL"),
            uid_map: format!("0 {uid} 1").into_bytes(),
            gid_map: format!("0 {gid} 1").into_bytes(),
        })
    }

    /// In the child: new user, mount and network namespaces; everything read-only but
    /// the scratch directory.
    fn enter(&self) -> std::io::Result<()> {
        let check = |r: libc::c_long| {
            if r < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY: plain system calls on prepared, NUL-terminated buffers.
        unsafe {
            check(
                libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::CLONE_NEWNET) as _,
            )?;
            write_file(c"/proc/self/setgroups", b"deny")?;
            write_file(c"/proc/self/uid_map", &self.uid_map)?;
            write_file(c"/proc/self/gid_map", &self.gid_map)?;
            check(libc::mount(
                std::ptr::null(),
                self.root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) as _)?;
            check(libc::mount(
                self.scratch.as_ptr(),
                self.scratch.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ) as _)?;
            let attr = |set: u64, clr: u64| MountAttr {
                attr_set: set,
                attr_clr: clr,
                propagation: 0,
                userns_fd: 0,
            };
            let ro = attr(MOUNT_ATTR_RDONLY, 0);
            check(libc::syscall(
                libc::SYS_mount_setattr,
                libc::AT_FDCWD,
                self.root.as_ptr(),
                AT_RECURSIVE,
                &ro as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            ))?;
            let rw = attr(0, MOUNT_ATTR_RDONLY);
            check(libc::syscall(
                libc::SYS_mount_setattr,
                libc::AT_FDCWD,
                self.scratch.as_ptr(),
                0 as libc::c_uint,
                &rw as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            ))?;
            // The working directory was opened before the new mount: enter it again.
            check(libc::chdir(self.scratch.as_ptr()) as _)?;
        }
        Ok(())
    }
}

/// Writes `bytes` to `path` with raw system calls (safe after fork).
unsafe fn write_file(path: &std::ffi::CStr, bytes: &[u8]) -> std::io::Result<()> {
    let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let n = libc::write(fd, bytes.as_ptr().cast(), bytes.len());
    libc::close(fd);
    if n != bytes.len() as isize {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// [`Sandbox`] as a reward source over texts whose reference answers are tests: each
/// response's pass fraction.
#[derive(Debug)]
pub struct UnitTests {
    name: String,
    sandbox: Sandbox,
}

impl UnitTests {
    /// A source named `name`; errors as [`Sandbox::new`].
    pub fn new(name: &str, config: &UnitTestsConfig) -> Result<Self> {
        Ok(Self {
            name: name.into(),
            sandbox: Sandbox::new(config.clone())?,
        })
    }

    /// The reports of a batch (what VeRPO's per-test credit reads).
    pub fn reports<B: Backend>(&self, input: &Texts<B>) -> Result<Vec<Report>> {
        let jobs = (0..input.responses.len())
            .map(|i| {
                let tests = input.answer(i, "unit_tests")?;
                Ok((program_of(&input.responses[i]), tests_of(tests)))
            })
            .collect::<Result<Vec<_>>>()?;
        self.sandbox.run_all(&jobs)
    }
}

impl<B: Backend> RewardSource<B, Texts<B>> for UnitTests {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, input: &Texts<B>) -> Result<RewardOutput<B>> {
        let reports = self.reports(input)?;
        input.output(reports.iter().map(|r| r.score() as f32).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(timeout_s: f64) -> Sandbox {
        Sandbox::new(UnitTestsConfig {
            timeout_s,
            cpu_s: 5,
            memory_mb: 512,
            ..Default::default()
        })
        .unwrap()
    }

    const ADD: &str = "def add(a, b):\n    return a + b\n";

    fn tests(t: &[&str]) -> Vec<String> {
        t.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn programs_and_tests_are_read_from_text() {
        let r = "Here it is:\n```python\ndef f():\n    return 1\n```\nand a fix:\n```\ndef f():\n    return 2\n```\n";
        assert_eq!(program_of(r), "def f():\n    return 2\n");
        assert_eq!(program_of("def g(): pass"), "def g(): pass");
        assert_eq!(program_of("```python\nunclosed"), "```python\nunclosed");
        assert_eq!(
            tests_of("[\"assert f() == 2\", \"assert True\"]"),
            tests(&["assert f() == 2", "assert True"])
        );
        assert_eq!(
            tests_of("assert f() == 2\n\nassert f() > 0\n"),
            tests(&["assert f() == 2", "assert f() > 0"])
        );
    }

    #[test]
    fn a_correct_program_passes_and_each_failure_says_why() {
        let s = sandbox(10.0);
        assert!(
            s.sandboxed(),
            "user namespaces are available on this machine"
        );
        let all = s
            .run(
                ADD,
                &tests(&["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]),
            )
            .unwrap();
        assert_eq!(all.score(), 1.0, "{all:?}");
        assert_eq!(all.ending, Ending::Exited(0));
        let some = s
            .run(
                ADD,
                &tests(&["assert add(1, 2) == 3", "assert add(1, 2) == 4", "add(1)"]),
            )
            .unwrap();
        assert!((some.score() - 1.0 / 3.0).abs() < 1e-12, "{some:?}");
        assert_eq!(some.tests[1].reason, "AssertionError: ");
        assert!(
            some.tests[2].reason.starts_with("TypeError"),
            "{:?}",
            some.tests[2]
        );
        // A program that does not run, or exits before the tests, fails them all.
        let broken = s.run("def add(a, b)\n", &tests(&["assert True"])).unwrap();
        assert!(
            broken.tests[0].reason.starts_with("program: SyntaxError"),
            "{broken:?}"
        );
        let exits = s
            .run("import sys\nsys.exit(0)\n", &tests(&["assert True"]))
            .unwrap();
        assert_eq!(exits.score(), 0.0);
        assert!(
            exits.tests[0].reason.starts_with("program: SystemExit"),
            "{exits:?}"
        );
        // Printing does not disturb the reports; output over the cap is dropped.
        let loud = s
            .run("print('x' * 200000)\n", &tests(&["assert True"]))
            .unwrap();
        assert_eq!((loud.score(), loud.truncated), (1.0, true));
        // The program's directory is its own to write.
        let writes = s
            .run(
                "open('out.txt', 'w').write('hi')\n",
                &tests(&["assert open('out.txt').read() == 'hi'"]),
            )
            .unwrap();
        assert_eq!(writes.score(), 1.0, "{writes:?}");
    }

    #[test]
    fn hostile_programs_are_stopped_with_the_reason() {
        let s = sandbox(2.0);
        let check = |program: &str, want: &[&str]| {
            let r = s.run(program, &tests(&["assert True"])).unwrap();
            assert_eq!(r.score(), 0.0, "{program}: {r:?}");
            let why = &r.tests[0].reason;
            assert!(
                want.iter().any(|w| why.contains(w)),
                "{program}: {why} ({r:?})"
            );
            r
        };
        // Loops forever: killed at the wall-clock limit.
        let r = check(
            "while True:\n    pass\n",
            &["wall-clock limit of 2 s", "resource limit"],
        );
        assert!(r.seconds < 4.0, "{r:?}");
        // 10 GB: over the address-space limit.
        check("x = bytearray(10 * 1024 ** 3)\n", &["MemoryError"]);
        // The network: there is none to reach.
        check(
            "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)\n",
            &["Network is unreachable", "OSError"],
        );
        // Outside its directory: a read-only file system.
        let outside = std::env::temp_dir().join(format!("goodhart-escape-{}", std::process::id()));
        check(
            &format!(
                "open({:?}, 'w').write('x')\n",
                outside.display().to_string()
            ),
            &["Read-only file system"],
        );
        assert!(!outside.exists(), "the program wrote outside its directory");
        // A fork bomb meets the process limit.
        // A fork bomb: no new process, at once; threads still run.
        let r = check(
            "import os\nwhile True:\n    os.fork()\n",
            &["BlockingIOError: [Errno 11]"],
        );
        assert!(r.seconds < 1.0, "{r:?}");
        let threads = s
            .run(
                "import threading\nout = []\nt = threading.Thread(target=lambda: out.append(1))\nt.start()\nt.join()\n",
                &tests(&["assert out == [1]"]),
            )
            .unwrap();
        assert_eq!(threads.score(), 1.0, "{threads:?}");
    }

    #[test]
    fn batches_run_in_parallel_in_order() {
        let s = sandbox(10.0);
        let jobs: Vec<(String, Vec<String>)> = (0..8)
            .map(|i| {
                (
                    format!("def f():\n    return {i}\n"),
                    tests(&[&format!("assert f() == {}", i % 2)]),
                )
            })
            .collect();
        let scores: Vec<f64> = s
            .run_all(&jobs)
            .unwrap()
            .iter()
            .map(Report::score)
            .collect();
        // f() == i passes `assert f() == i % 2` for i = 0 and 1 only.
        assert_eq!(scores, vec![1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn configs_are_checked() {
        for (bad, key) in [
            (
                UnitTestsConfig {
                    timeout_s: 0.0,
                    ..Default::default()
                },
                "timeout_s",
            ),
            (
                UnitTestsConfig {
                    workers: 0,
                    ..Default::default()
                },
                "workers",
            ),
            (
                UnitTestsConfig {
                    memory_mb: 0,
                    ..Default::default()
                },
                "memory_mb",
            ),
        ] {
            assert!(bad.validate().unwrap_err().to_string().contains(key));
        }
        let missing = Sandbox::new(UnitTestsConfig {
            python: "no-such-python".into(),
            ..Default::default()
        });
        assert!(missing.unwrap_err().to_string().contains("no-such-python"));
    }
}
