//! Where a migration goes: `tcp:HOST:PORT` or `unix:PATH`, and the
//! connection both sides talk over.
//!
//! A [`Conn`] is a TCP or Unix stream with read and write timeouts, so a
//! peer that goes silent (a cut link) is an error after [`Conn::set_timeout`]
//! rather than a hang; a peer that dies is one at once (its kernel closes
//! the connection).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

/// A migration endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// `tcp:HOST:PORT` (HOST may be a name, an IPv4 address or `[IPv6]`).
    Tcp(String),
    /// `unix:PATH`.
    Unix(PathBuf),
}

impl std::str::FromStr for Address {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("tcp:") {
            let ok = rest.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                return Err(format!("invalid migration address {s:?}: expected tcp:HOST:PORT"));
            }
            Ok(Address::Tcp(rest.to_string()))
        } else if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("invalid migration address {s:?}: expected unix:PATH"));
            }
            Ok(Address::Unix(PathBuf::from(path)))
        } else {
            Err(format!("invalid migration address {s:?}: expected tcp:HOST:PORT or unix:PATH"))
        }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp(a) => write!(f, "tcp:{a}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Bytes of socket buffer asked for on each side: a few round trips of a
/// fast link in flight (the kernel caps it at net.core.[rw]mem_max).
const SOCKET_BUFFER: usize = 4 << 20;

/// A connection of either kind.
#[derive(Debug)]
pub enum Conn {
    /// TCP.
    Tcp(TcpStream),
    /// Unix stream.
    Unix(UnixStream),
}

impl Conn {
    /// Connects to `addr`, giving up after `timeout`.
    ///
    /// # Errors
    /// The connection could not be made.
    pub fn connect(addr: &Address, timeout: Duration) -> std::io::Result<Conn> {
        let conn = match addr {
            Address::Tcp(a) => {
                let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, format!("{a} resolves to no address"));
                let mut found = None;
                for sa in a.to_socket_addrs()? {
                    match TcpStream::connect_timeout(&sa, timeout) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = found.ok_or(last)?;
                s.set_nodelay(true)?;
                Conn::Tcp(s)
            }
            Address::Unix(p) => Conn::Unix(UnixStream::connect(p)?),
        };
        conn.tune();
        Ok(conn)
    }

    /// Sets the read and write timeout (`None`: wait for ever).
    ///
    /// # Errors
    /// The socket refused the option.
    pub fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
            Conn::Unix(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
        }
    }

    /// A second handle on the same connection (one thread reads while
    /// another writes).
    ///
    /// # Errors
    /// dup(2) failed.
    pub fn try_clone(&self) -> std::io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
        })
    }

    /// Shuts both directions down (wakes a thread blocked reading it).
    pub fn shutdown(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    fn fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        match self {
            Conn::Tcp(s) => s.as_raw_fd(),
            Conn::Unix(s) => s.as_raw_fd(),
        }
    }

    /// Asks for large socket buffers (best effort).
    fn tune(&self) {
        let size = SOCKET_BUFFER as libc::c_int;
        for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
            // SAFETY: setsockopt on our own socket with a c_int option value
            // of the size passed; failure only leaves the default.
            unsafe { libc::setsockopt(self.fd(), libc::SOL_SOCKET, opt, (&raw const size).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t) };
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => s.flush(),
            Conn::Unix(s) => s.flush(),
        }
    }
}

/// A bound endpoint waiting for one source. A Unix socket's file is
/// removed on drop.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix, with its path.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `addr` (a stale Unix socket file is replaced).
    ///
    /// # Errors
    /// The address is in use or cannot be bound.
    pub fn bind(addr: &Address) -> std::io::Result<Listener> {
        match addr {
            Address::Tcp(a) => Ok(Listener::Tcp(TcpListener::bind(a.as_str())?)),
            Address::Unix(p) => {
                if p.exists() && UnixStream::connect(p).is_err() {
                    std::fs::remove_file(p)?;
                }
                Ok(Listener::Unix(UnixListener::bind(p)?, p.clone()))
            }
        }
    }

    /// The address actually bound (`tcp:HOST:0` names the port chosen).
    #[must_use]
    pub fn local(&self) -> String {
        match self {
            Listener::Tcp(l) => l.local_addr().map_or_else(|_| "tcp:?".into(), |a| format!("tcp:{a}")),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }

    /// Waits for the source.
    ///
    /// # Errors
    /// accept(2) failed.
    pub fn accept(&self) -> std::io::Result<Conn> {
        let conn = match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Conn::Tcp(s)
            }
            Listener::Unix(l, _) => Conn::Unix(l.accept()?.0),
        };
        conn.tune();
        Ok(conn)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_print_back() {
        for text in ["tcp:127.0.0.1:4444", "tcp:[::1]:5", "tcp:dest.example:80", "unix:/tmp/m.sock"] {
            let a: Address = text.parse().unwrap();
            assert_eq!(a.to_string(), text);
        }
        for bad in ["127.0.0.1:4444", "tcp:4444", "tcp::1", "tcp:host:99999", "unix:", "udp:x:1"] {
            assert!(bad.parse::<Address>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_unix_listener_accepts_and_removes_its_file() {
        let path = std::env::temp_dir().join(format!("memvisor-mig-transport-{}", std::process::id()));
        let addr = Address::Unix(path.clone());
        let l = Listener::bind(&addr).unwrap();
        let t = std::thread::spawn(move || {
            let mut c = Conn::connect(&addr, Duration::from_secs(5)).unwrap();
            c.write_all(b"hi").unwrap();
        });
        let mut got = [0u8; 2];
        l.accept().unwrap().read_exact(&mut got).unwrap();
        t.join().unwrap();
        assert_eq!(&got, b"hi");
        drop(l);
        assert!(!path.exists());
    }
}
