//! A redis-server child process on a free loopback port, for the bench's tier
//! scenarios and for tests: started here, stopped (its own pid) when dropped.
//! Needs the `redis-server` and `redis-cli` binaries (Debian packages
//! `redis-server` and `redis-tools`).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::BenchError;

/// One redis-server, without persistence.
#[derive(Debug)]
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    extra: Vec<String>,
}

fn binary() -> PathBuf {
    for p in ["/usr/bin/redis-server", "/usr/local/bin/redis-server"] {
        if std::path::Path::new(p).exists() {
            return p.into();
        }
    }
    PathBuf::from("redis-server")
}

fn free_port() -> Result<u16, BenchError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| BenchError::Io(format!("a free loopback port for redis-server: {e}")))
}

impl RedisServer {
    /// Starts redis-server on a free port and waits until it answers PING.
    pub fn start() -> Result<RedisServer, BenchError> {
        Self::start_with(&[])
    }

    /// As [`RedisServer::start`], with more `redis-server` arguments.
    pub fn start_with(extra: &[&str]) -> Result<RedisServer, BenchError> {
        let dir = tempfile::tempdir()
            .map_err(|e| BenchError::Io(format!("redis-server's directory: {e}")))?;
        let mut r = RedisServer {
            port: free_port()?,
            dir,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        r.restart()?;
        Ok(r)
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The server's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (SIGKILL: what a crash looks like to its clients).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port, empty.
    pub fn restart(&mut self) -> Result<(), BenchError> {
        self.kill();
        let child = Command::new(binary())
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                BenchError::Spawn(format!(
                    "redis-server: {e} (install it: Debian package redis-server)"
                ))
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.ping() {
            if Instant::now() >= deadline {
                return Err(BenchError::Spawn(format!(
                    "redis-server on port {} did not answer PING within 10 s",
                    self.port
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// The reply of `redis-cli -p <port> <args>`, as text (empty if it fails).
    pub fn cli(&self, args: &[&str]) -> String {
        Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Calls of each Redis command so far (`INFO commandstats`), by command name
    /// in lower case.
    pub fn command_calls(&self) -> std::collections::BTreeMap<String, u64> {
        parse_commandstats(&self.cli(&["INFO", "commandstats"]))
    }
}

/// `cmdstat_<name>:calls=<n>,…` lines of `INFO commandstats`.
pub fn parse_commandstats(text: &str) -> std::collections::BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (name, rest) = l.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.parse().ok()?))
        })
        .collect()
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of three masters (no replicas) on free loopback ports, made
/// with `redis-cli --cluster create`, stopped when dropped.
#[derive(Debug)]
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> Result<RedisCluster, BenchError> {
        let nodes = (0..3)
            .map(|_| RedisServer::start_with(&["--cluster-enabled", "yes"]))
            .collect::<Result<Vec<_>, _>>()?;
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .map_err(|e| {
                BenchError::Spawn(format!("redis-cli: {e} (Debian package redis-tools)"))
            })?;
        if !out.status.success() {
            return Err(BenchError::Spawn(format!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stdout)
            )));
        }
        let c = RedisCluster { nodes };
        c.wait_ok()?;
        Ok(c)
    }

    /// `redis://…` of every master.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// Kills every master (SIGKILL), as a crash of the whole cluster.
    pub fn kill(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
    }

    /// Starts every master again on its port, empty but with its cluster
    /// configuration (`nodes.conf` in its directory), and waits until the
    /// cluster is back in state ok.
    pub fn restart(&mut self) -> Result<(), BenchError> {
        for n in &mut self.nodes {
            n.restart()?;
        }
        self.wait_ok()
    }

    fn wait_ok(&self) -> Result<(), BenchError> {
        // Every node must agree the cluster is up before clients use it.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self
            .nodes
            .iter()
            .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        {
            if Instant::now() >= deadline {
                return Err(BenchError::Spawn(
                    "the Redis Cluster did not reach state ok within 20 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_command_calls() {
        let text = "# Commandstats\r\ncmdstat_publish:calls=12,usec=40,usec_per_call=3.33,rejected_calls=0,failed_calls=0\r\ncmdstat_evalsha:calls=7,usec=1\r\nnoise\r\n";
        let m = parse_commandstats(text);
        assert_eq!(m.get("publish"), Some(&12));
        assert_eq!(m.get("evalsha"), Some(&7));
        assert_eq!(m.len(), 2);
    }
}
