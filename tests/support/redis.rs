//! A real `redis-server` for the tests: started from PATH on a free loopback port, killed and
//! restarted on the same port when a test asks, stopped when dropped.
//!
//! Without `redis-server` on PATH the tests that need it are skipped with a printed line —
//! unless `TOWER_LLM_RESILIENCE_REQUIRE_REDIS` is set (CI sets it), which makes a missing
//! server a failure.
#![allow(dead_code)] // each test binary uses the part it needs

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The variable that turns a missing `redis-server` into a test failure.
pub const REQUIRE: &str = "TOWER_LLM_RESILIENCE_REQUIRE_REDIS";

pub struct RedisServer {
    child: Option<Child>,
    port: u16,
}

impl RedisServer {
    /// A fresh server, or `None` (with a line saying so) when none can be run here.
    pub async fn start(test: &str) -> Option<Self> {
        let found = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            if std::env::var_os(REQUIRE).is_some() {
                panic!("{test}: redis-server is not on PATH and {REQUIRE} is set");
            }
            eprintln!(
                "skipped {test}: redis-server is not on PATH (Debian: apt-get install \
                 redis-server; set {REQUIRE}=1 to make this a failure)"
            );
            return None;
        }
        let port = free_port();
        let mut server = Self { child: None, port };
        server.spawn().await;
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start redis-server: {e}"));
        self.child = Some(child);
        // Ready once it answers a PING.
        for _ in 0..200 {
            if ping(self.port).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server on port {} did not come up", self.port);
    }

    /// Kills the server (its data goes with it).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind loopback: {e}"));
    listener
        .local_addr()
        .unwrap_or_else(|e| panic!("local addr: {e}"))
        .port()
}

async fn ping(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    if s.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf).await, Ok(n) if buf[..n].starts_with(b"+PONG"))
}
