//! A minimal Redis client for the `compare` harness's Redis rows: it starts
//! a `redis-server` on a free loopback port and speaks only what
//! `SET key 1 NX EX ttl` needs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A minimal Redis client: only what `SET key 1 NX EX ttl` needs.
pub struct Redis {
    server: Child,
    conn: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Redis {
    pub fn start() -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let server = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .ok()?;
        for _ in 0..100 {
            if let Ok(conn) = TcpStream::connect(("127.0.0.1", port)) {
                conn.set_nodelay(true).ok()?;
                let reader = BufReader::new(conn.try_clone().ok()?);
                return Some(Self {
                    server,
                    conn,
                    reader,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn set_nx(buf: &mut Vec<u8>, key: &[u8]) {
        buf.extend_from_slice(b"*6\r\n$3\r\nSET\r\n$");
        buf.extend_from_slice(key.len().to_string().as_bytes());
        buf.extend_from_slice(b"\r\n");
        buf.extend_from_slice(key);
        buf.extend_from_slice(b"\r\n$1\r\n1\r\n$2\r\nNX\r\n$2\r\nEX\r\n$5\r\n86400\r\n");
    }

    /// Sends the commands in `buf`, reads `n` replies, returns how many were OK.
    pub fn round_trip(&mut self, buf: &[u8], n: usize) -> usize {
        self.conn.write_all(buf).expect("redis write");
        let mut ok = 0;
        let mut line = String::new();
        for _ in 0..n {
            line.clear();
            self.reader.read_line(&mut line).expect("redis read");
            if line.starts_with("+OK") {
                ok += 1;
            } else if line.starts_with("$-1") {
            } else {
                panic!("redis: unexpected reply {line:?}");
            }
        }
        ok
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let mut rest = Vec::new();
        let _ = self.reader.read_to_end(&mut rest);
    }
}
