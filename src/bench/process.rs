//! The processes a benchmark measures: starting `quicpush serve` or the raw floor
//! as a child, finding their addresses, and reading their CPU time and memory from
//! /proc.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use parking_lot::Mutex;

use super::BenchError;
use crate::Config;

/// Most log lines a [`ServerProcess`] keeps; later ones are counted, not kept,
/// except errors and panics, which are always kept.
const MAX_LOG_LINES: usize = 200_000;

/// The log lines a child wrote to stderr.
#[derive(Debug, Default)]
struct LogLines {
    lines: Vec<String>,
    dropped: usize,
}

/// A child process being measured, stopped with SIGTERM on drop.
pub struct ServerProcess {
    child: Option<Child>,
    pub pid: u32,
    pub client_tcp: SocketAddr,
    pub client_quic: SocketAddr,
    /// The WebSocket listener, when the server logged one (quicpush only).
    pub client_ws: Option<SocketAddr>,
    /// Backend RPC (quicpush) or the control port (raw floor).
    pub control: SocketAddr,
    log: Arc<Mutex<LogLines>>,
}

impl ServerProcess {
    /// Starts `exe args...` and waits until it has logged its client TCP, client
    /// QUIC and control addresses, the log messages named by `want` (each ending
    /// with `addr=<socket address>`).
    pub fn spawn(
        exe: &Path,
        args: &[String],
        want: [&str; 3],
    ) -> Result<ServerProcess, BenchError> {
        let log_filter = std::env::var("QUICPUSH_CHILD_LOG").unwrap_or_else(|_| "info".into());
        let mut child = Command::new(exe)
            .args(args)
            .env("RUST_LOG", log_filter)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| BenchError::Spawn(format!("{}: {e}", exe.display())))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| BenchError::Spawn("no stderr pipe".into()))?;
        let (tx, rx) = mpsc::channel();
        let log = Arc::new(Mutex::new(LogLines::default()));
        let keep = log.clone();
        // Keeps draining the child's log for its whole life, so it never blocks on a
        // full pipe; warnings and errors are passed through, every line is kept.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("WARN") || line.contains("ERROR") {
                    eprintln!("[server] {line}");
                }
                {
                    let mut log = keep.lock();
                    if log.lines.len() < MAX_LOG_LINES
                        || line.contains("ERROR")
                        || line.contains("panicked")
                    {
                        log.lines.push(line.clone());
                    } else {
                        log.dropped += 1;
                    }
                }
                let _ = tx.send(line);
            }
        });
        let mut found: Vec<Option<SocketAddr>> = vec![None; want.len()];
        // Logged before the client QUIC listener, so seen by the time it is.
        let mut client_ws = None;
        while found.iter().any(Option::is_none) {
            let line = match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(l) => l,
                Err(_) => {
                    let _ = child.kill();
                    return Err(BenchError::Spawn(format!(
                        "{} did not report its addresses",
                        exe.display()
                    )));
                }
            };
            for (i, w) in want.iter().enumerate() {
                if found[i].is_none() {
                    found[i] = listening_addr(&line, w);
                }
            }
            if client_ws.is_none() {
                client_ws = listening_addr(&line, "client WebSocket listening");
            }
        }
        let addrs: Vec<SocketAddr> = found.into_iter().flatten().collect();
        Ok(ServerProcess {
            pid: child.id(),
            child: Some(child),
            client_tcp: addrs[0],
            client_quic: addrs[1],
            client_ws,
            control: addrs[2],
            log,
        })
    }

    /// Starts `quicpush serve` with `config`, whose listeners should be on port 0
    /// (the kernel's choice is read from the log).
    pub fn quicpush_with(
        exe: &Path,
        dir: &Path,
        config: &Config,
    ) -> Result<ServerProcess, BenchError> {
        let path = dir.join("quicpush.toml");
        let text = toml::to_string(config)
            .map_err(|e| BenchError::Io(format!("cannot write the server's config: {e}")))?;
        std::fs::write(&path, text)
            .map_err(|e| BenchError::Io(format!("{}: {e}", path.display())))?;
        let args = vec![
            "serve".to_string(),
            "--config".into(),
            path.display().to_string(),
        ];
        Self::spawn(
            exe,
            &args,
            [
                "client TCP listening",
                "client QUIC listening",
                "backend RPC listening",
            ],
        )
    }

    /// Every log line the child has written so far (up to a bound; errors and
    /// panics past it too).
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().lines.clone()
    }

    /// Log lines past the bound that were counted but not kept.
    pub fn log_dropped(&self) -> usize {
        self.log.lock().dropped
    }

    /// Sends SIGTERM without waiting.
    pub fn sigterm(&self) -> Result<(), BenchError> {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .map_err(|e| BenchError::Io(format!("kill -TERM {}: {e}", self.pid)))?;
        if status.success() {
            Ok(())
        } else {
            Err(BenchError::Io(format!("kill -TERM {}: {status}", self.pid)))
        }
    }

    /// Kills the child at once (SIGKILL, as a crash would) and reaps it. Does
    /// nothing for a process started elsewhere.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits up to `limit` for the child to exit (after [`ServerProcess::sigterm`]).
    /// `None` if it is still running, or was started elsewhere.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the raw floor server (`quicpush bench-floor`).
    pub fn floor(
        exe: &Path,
        dir: &Path,
        tcp_send_buffer: u32,
    ) -> Result<ServerProcess, BenchError> {
        let args = vec![
            "bench-floor".to_string(),
            "--certs".into(),
            dir.display().to_string(),
            "--tcp-send-buffer".into(),
            tcp_send_buffer.to_string(),
        ];
        Self::spawn(
            exe,
            &args,
            [
                "floor TCP listening",
                "floor QUIC listening",
                "floor control listening",
            ],
        )
    }

    /// A process started elsewhere: measured, never stopped.
    pub fn external(pid: u32, client: SocketAddr, control: SocketAddr) -> ServerProcess {
        ServerProcess {
            child: None,
            pid,
            client_tcp: client,
            client_quic: client,
            client_ws: Some(client),
            control,
            log: Arc::default(),
        }
    }

    /// Asks the child to stop (SIGTERM) and waits for it.
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            for _ in 0..300 {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// The configuration benchmarks start `quicpush serve` with: loopback ports
/// chosen by the kernel, certificates in `dir`, no idle or connection limits in
/// the way of a long run.
pub fn bench_config(dir: &Path) -> Config {
    let mut config = Config::loopback(dir);
    config.client.heartbeat_timeout = Duration::from_secs(3600);
    config.client.max_connections = 1_000_000;
    config.quic.idle_timeout = Duration::from_secs(3600);
    config
}

/// The address in a log line `... <what> addr=<address>`.
pub fn listening_addr(line: &str, what: &str) -> Option<SocketAddr> {
    if !line.contains(what) {
        return None;
    }
    let start = line.find("addr=")? + 5;
    line[start..].split_whitespace().next()?.parse().ok()
}

/// Clock ticks per second of /proc's CPU times.
fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// CPU time and memory of several processes together (the nodes of a tier).
#[derive(Debug, Clone)]
pub struct ProcStats(pub Vec<ProcStat>);

impl ProcStats {
    pub fn new(pids: impl IntoIterator<Item = u32>) -> ProcStats {
        ProcStats(pids.into_iter().map(ProcStat::new).collect())
    }

    /// User + system CPU time of them all, microseconds.
    pub fn cpu_us(&self) -> Result<u64, BenchError> {
        self.0.iter().map(ProcStat::cpu_us).sum()
    }

    /// Resident set size of them all, bytes.
    pub fn rss_bytes(&self) -> Result<u64, BenchError> {
        self.0.iter().map(ProcStat::rss_bytes).sum()
    }
}

/// Reads a process's CPU time and resident memory.
#[derive(Debug, Clone)]
pub struct ProcStat {
    stat: PathBuf,
    status: PathBuf,
    tick_us: u64,
}

impl ProcStat {
    pub fn new(pid: u32) -> ProcStat {
        ProcStat {
            stat: PathBuf::from(format!("/proc/{pid}/stat")),
            status: PathBuf::from(format!("/proc/{pid}/status")),
            tick_us: 1_000_000 / clock_ticks().max(1),
        }
    }

    /// User + system CPU time, microseconds.
    pub fn cpu_us(&self) -> Result<u64, BenchError> {
        let text = std::fs::read_to_string(&self.stat)
            .map_err(|e| BenchError::Io(format!("{}: {e}", self.stat.display())))?;
        // Fields after the parenthesised command name; utime and stime are the
        // 14th and 15th fields of the whole line.
        let after = text
            .rfind(')')
            .map(|i| &text[i + 1..])
            .ok_or_else(|| BenchError::Io(format!("{}: unexpected format", self.stat.display())))?;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let num = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok((num(11) + num(12)) * self.tick_us)
    }

    /// Resident set size, bytes.
    pub fn rss_bytes(&self) -> Result<u64, BenchError> {
        let text = std::fs::read_to_string(&self.status)
            .map_err(|e| BenchError::Io(format!("{}: {e}", self.status.display())))?;
        text.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .ok_or_else(|| BenchError::Io(format!("{}: no VmRSS", self.status.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_cpu_and_memory() {
        let p = ProcStat::new(std::process::id());
        assert!(p.rss_bytes().unwrap() > 0);
        let _ = p.cpu_us().unwrap();
    }

    #[test]
    fn parses_listening_lines() {
        let line =
            "2026-11-24T16:07:36Z  INFO quicpush::server: client TCP listening addr=127.0.0.1:4000";
        assert_eq!(
            listening_addr(line, "client TCP listening"),
            Some("127.0.0.1:4000".parse().unwrap())
        );
        assert_eq!(listening_addr(line, "client QUIC listening"), None);
    }
}
