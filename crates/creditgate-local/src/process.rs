//! Child processes of the launchers: spawning with logs to files, a watchdog that stops
//! them when the parent process dies (a crash, `SIGKILL`, or a static that Rust never
//! drops), signals, bounded waits, free ports, port retry and log tails for errors.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{mpsc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Bytes of each log file quoted in an error.
const LOG_TAIL_BYTES: u64 = 4_000;
/// How long a graceful stop may take before SIGKILL.
pub(crate) const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs after the parent process is gone: signals the server, waits a little, SIGKILLs it and
/// removes its directory. Exits quietly when the server stops first (stopped by its owner).
const WATCHDOG: &str = r#"
t=$1; s=$2; sig=$3; d=$4
while kill -0 "$t" 2>/dev/null && kill -0 "$s" 2>/dev/null; do sleep 0.5; done
kill -0 "$t" 2>/dev/null && exit 0
kill -s CONT "$s" 2>/dev/null
kill -s "$sig" "$s" 2>/dev/null
i=0
while kill -0 "$s" 2>/dev/null && [ "$i" -lt 40 ]; do sleep 0.25; i=$((i+1)); done
kill -0 "$s" 2>/dev/null && kill -s KILL "$s" 2>/dev/null
sleep 0.5
rm -rf "$d"
"#;

/// A free TCP port on 127.0.0.1, never the same twice in this process. Another process
/// may still take it before the server binds it; launchers retry `start` with fresh
/// ports when the first attempt fails.
pub(crate) fn free_port() -> Result<u16> {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed_out = HANDED_OUT.get_or_init(Mutex::default);
    // Hold every listener until the loop ends so the OS cannot return the same port.
    let mut held = Vec::new();
    for _ in 0..64 {
        let listener = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        held.push(listener);
        if lock(handed_out).insert(port) {
            return Ok(port);
        }
    }
    bail!("no free port found on 127.0.0.1")
}

/// Whether this process runs as root (`id -u` is 0).
pub(crate) fn running_as_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false)
    })
}

/// uid and gid of a system user, via `id`.
pub(crate) fn user_ids(user: &str) -> Result<(u32, u32)> {
    let id = |flag: &str| -> Result<u32> {
        let out = run_bounded(
            Command::new("id").args([flag, user]),
            Duration::from_secs(5),
        )?;
        if !out.status.success() {
            bail!(
                "no system user {user:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        text.trim()
            .parse()
            .with_context(|| format!("`id {flag} {user}` printed {text:?}"))
    };
    Ok((id("-u")?, id("-g")?))
}

/// Runs a short command to completion, killing it after `timeout`.
pub(crate) fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let program = format!("{:?}", cmd.get_program());
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {program}"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(output) => Ok(output.with_context(|| format!("wait for {program}"))?),
        Err(_) => {
            let _ = send_signal(pid, "KILL");
            bail!("{program} did not finish within {timeout:?}")
        }
    }
}

/// `kill -s <signal> <pid>` (the workspace forbids `unsafe`, so no `libc::kill`).
pub(crate) fn send_signal(pid: u32, signal: &str) -> Result<()> {
    let status = Command::new("kill")
        .args(["-s", signal, &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("run kill")?;
    if !status.success() {
        bail!("kill -s {signal} {pid} failed ({status})");
    }
    Ok(())
}

/// The last few KB of each log file, labelled, for error messages.
pub(crate) fn log_tails(paths: &[PathBuf]) -> String {
    let mut out = String::new();
    for path in paths {
        let Ok(mut file) = File::open(path) else {
            continue;
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len == 0 {
            continue;
        }
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)));
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes);
        out.push_str(&format!(
            "\n--- last {} bytes of {} ---\n{}",
            bytes.len(),
            path.display(),
            String::from_utf8_lossy(&bytes)
        ));
    }
    if out.is_empty() {
        out.push_str("\n(no log output)");
    }
    out
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Running {
    child: Child,
    watchdog: Option<Child>,
}

/// One server process at a time (it can be killed and started again), its logs and the
/// directory the watchdog removes if the parent process dies first.
pub(crate) struct Supervisor {
    name: &'static str,
    /// Where stdout goes.
    stdout_log: PathBuf,
    /// Where stderr goes (`None`: into the stdout log).
    stderr_log: Option<PathBuf>,
    /// Every log file whose tail goes into errors.
    logs: Vec<PathBuf>,
    dir: PathBuf,
    /// Graceful stop signal (`TERM`; `QUIT` = Postgres immediate shutdown).
    stop_signal: &'static str,
    /// On drop: graceful stop (bounded) rather than SIGKILL.
    graceful_drop: bool,
    running: Mutex<Option<Running>>,
}

impl Supervisor {
    pub(crate) fn new(
        name: &'static str,
        dir: &Path,
        stdout_log: PathBuf,
        extra_logs: Vec<PathBuf>,
        stop_signal: &'static str,
        graceful_drop: bool,
    ) -> Self {
        let mut logs = extra_logs;
        logs.push(stdout_log.clone());
        Self {
            name,
            stdout_log,
            stderr_log: None,
            logs,
            dir: dir.to_owned(),
            stop_signal,
            graceful_drop,
            running: Mutex::new(None),
        }
    }

    /// Sends stderr to its own file (also quoted in errors) instead of the stdout log.
    pub(crate) fn with_stderr_log(mut self, path: PathBuf) -> Self {
        self.logs.insert(0, path.clone());
        self.stderr_log = Some(path);
        self
    }

    /// Spawns `cmd` with stdin closed and output appended to the log(s); stops a previous
    /// process first.
    pub(crate) fn spawn(&self, cmd: &mut Command) -> Result<()> {
        self.kill9()?;
        let open = |path: &Path| {
            File::options()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("open {}", path.display()))
        };
        let stdout = open(&self.stdout_log)?;
        let stderr = match &self.stderr_log {
            Some(path) => open(path)?,
            None => stdout
                .try_clone()
                .context("duplicate the log file handle")?,
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawn {} ({:?})", self.name, cmd.get_program()))?;
        let watchdog = Command::new("sh")
            .args(["-c", WATCHDOG, "creditgate-local-watchdog"])
            .arg(std::process::id().to_string())
            .arg(child.id().to_string())
            .arg(self.stop_signal)
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let watchdog = match watchdog {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, server = self.name, "no watchdog: the server may outlive a crashed parent");
                None
            }
        };
        *lock(&self.running) = Some(Running { child, watchdog });
        Ok(())
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        lock(&self.running).as_ref().map(|r| r.child.id())
    }

    /// The exit status when the process has exited on its own (or after a signal).
    pub(crate) fn exited(&self) -> Option<ExitStatus> {
        let mut running = lock(&self.running);
        let status = running.as_mut()?.child.try_wait().ok().flatten()?;
        if let Some(r) = running.take() {
            stop_watchdog(r.watchdog);
        }
        Some(status)
    }

    pub(crate) fn is_running(&self) -> bool {
        self.pid().is_some() && self.exited().is_none()
    }

    pub(crate) fn signal(&self, signal: &str) -> Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| anyhow!("{} is not running", self.name))?;
        send_signal(pid, signal)
    }

    /// SIGSTOP, then waits (≤ 2 s) until every thread is stopped: `kill` returns when the
    /// signal is queued, and a busy thread may still answer one more request.
    pub(crate) fn pause(&self) -> Result<()> {
        self.signal("STOP")?;
        self.wait_for_threads(|state| state == 'T' || state == 't', "stopped")
    }

    /// SIGCONT, then waits (≤ 2 s) until no thread is stopped.
    pub(crate) fn resume(&self) -> Result<()> {
        self.signal("CONT")?;
        self.wait_for_threads(|state| state != 'T' && state != 't', "running")
    }

    fn wait_for_threads(&self, ok: impl Fn(char) -> bool, what: &str) -> Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| anyhow!("{} is not running", self.name))?;
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let states = thread_states(pid);
            if !states.is_empty() && states.iter().all(|s| ok(*s)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} (pid {pid}) not {what} within 2 s: thread states {states:?}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL and reap; no-op when not running.
    pub(crate) fn kill9(&self) -> Result<()> {
        let Some(mut r) = lock(&self.running).take() else {
            return Ok(());
        };
        stop_watchdog(r.watchdog.take());
        let _ = r.child.kill();
        r.child
            .wait()
            .with_context(|| format!("reap {}", self.name))?;
        Ok(())
    }

    /// Graceful stop with the server's stop signal; see [`Supervisor::stop_with`].
    pub(crate) fn stop(&self, timeout: Duration) -> Result<()> {
        self.stop_with(self.stop_signal, timeout).map(drop)
    }

    /// `signal` (after SIGCONT, in case it is paused), wait ≤ `timeout`, then SIGKILL.
    /// Returns the exit status of a process that exited in time, `None` when it had to
    /// be killed or was not running.
    pub(crate) fn stop_with(&self, signal: &str, timeout: Duration) -> Result<Option<ExitStatus>> {
        let Some(mut r) = lock(&self.running).take() else {
            return Ok(None);
        };
        stop_watchdog(r.watchdog.take());
        let pid = r.child.id();
        let _ = send_signal(pid, "CONT");
        let _ = send_signal(pid, signal);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = r.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    server = self.name,
                    ?timeout,
                    "graceful stop timed out; SIGKILL"
                );
                let _ = r.child.kill();
                r.child.wait()?;
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls `probe` until it succeeds; fails with the log tail when the process exits
    /// or `timeout` passes.
    pub(crate) fn wait_ready(
        &self,
        timeout: Duration,
        mut probe: impl FnMut() -> Result<()>,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last_error = anyhow!("not probed yet");
        loop {
            if let Some(status) = self.exited() {
                bail!(
                    "{} exited during startup ({status}); last probe: {last_error:#}{}",
                    self.name,
                    self.log_tail()
                );
            }
            match probe() {
                Ok(()) => return Ok(()),
                Err(e) => last_error = e,
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} not ready within {timeout:?}; last probe: {last_error:#}{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn log_tail(&self) -> String {
        log_tails(&self.logs)
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        let stopped = if self.graceful_drop {
            self.stop(Duration::from_secs(5))
        } else {
            self.kill9()
        };
        if let Err(e) = stopped {
            tracing::warn!(error = %e, server = self.name, "stop on drop failed");
        }
    }
}

/// The state letter (`R`, `S`, `T`…) of every thread of `pid`, from `/proc`.
fn thread_states(pid: u32) -> Vec<char> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
            // `pid (comm) S …`: the state follows the last ')' (comm may contain one).
            stat.rsplit_once(')')?.1.trim_start().chars().next()
        })
        .collect()
}

fn stop_watchdog(watchdog: Option<Child>) {
    if let Some(mut w) = watchdog {
        let _ = w.kill();
        let _ = w.wait();
    }
}

/// Retries `attempt` (typically: pick fresh ports and start) a few times; a port taken
/// between `free_port` and the server's bind makes only that attempt fail.
pub(crate) fn with_retries<T>(what: &str, mut attempt: impl FnMut() -> Result<T>) -> Result<T> {
    const ATTEMPTS: u32 = 3;
    let mut last = None;
    for n in 1..=ATTEMPTS {
        match attempt() {
            Ok(v) => return Ok(v),
            Err(e) => {
                tracing::warn!(attempt = n, error = %format!("{e:#}"), "{what} failed to start");
                last = Some(e);
            }
        }
    }
    Err(last
        .unwrap_or_else(|| anyhow!("no attempt"))
        .context(format!("{what}: {ATTEMPTS} attempts failed")))
}

/// A minimal HTTP/1.0 exchange (the reply is then never chunked and ends at close),
/// usable from sync and async code alike; every step is bounded by `timeout`.
pub(crate) fn http(
    port: u16,
    timeout: Duration,
    method: &str,
    target: &str,
    body: &[u8],
) -> Result<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connect to 127.0.0.1:{port}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let head = format!(
        "{method} {target} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut reply = Vec::new();
    stream
        .read_to_end(&mut reply)
        .with_context(|| format!("read the reply of 127.0.0.1:{port}"))?;
    let text = String::from_utf8_lossy(&reply);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("malformed HTTP reply: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("malformed HTTP status line: {head:?}"))?;
    Ok((status, body.to_owned()))
}
