//! A spend lane's own connection to one Redis: the lane writes its batch's script call
//! and reads the reply on a socket it owns, with no connection task between them and
//! no general reply parser (a spend batch's reply is an array of integers).
//!
//! Through the shared multiplexed connection, each batch cost two hand-offs between
//! tasks (lane to the connection's task and back) and a parse of the reply through the
//! client's general parser, about as much as the rest of the lane's work. This link
//! keeps the contract of [`crate::conn::invoke`] for the calls it makes:
//!
//! * `Unreachable` only when the call certainly did not reach Redis: connecting failed
//!   (a new connection is used only once the server answered its `AUTH`/`SELECT` or a
//!   `PING`), or a server error that refuses a script before it runs (classified as for
//!   every other call, by [`crate::conn::fail`]).
//! * `Ambiguous` when it may have run: the connection broke or gave no complete reply
//!   within the response timeout. The connection is then dropped (a late reply must not
//!   be taken for the next call's), and the next call connects again.
//! * A script missing on the server (`NOSCRIPT`, after a restart) is sent once more as
//!   `EVAL`, which loads it.
//!
//! A connection the server closed while the lane was idle (a restart, a kill) is noticed
//! before the next call is written (the socket reads end-of-file), so that call goes on
//! a new connection instead of being lost in an ambiguous state.
//!
//! Only for one Redis over TCP; a cluster, or a Unix socket, keeps the shared
//! connection.

use std::io;
use std::time::Duration;

use creditgate_limiter::ports::HotError;
use redis::{ConnectionAddr, FromRedisValue};
use tokio::net::TcpStream;

use crate::conn::{fail, Call, Target};
use crate::metrics as m;

/// A lane's connection (opened when the store starts, and again by the call after it
/// broke).
pub(crate) struct Link {
    host: String,
    port: u16,
    /// `AUTH` and `SELECT` (or a `PING`) as sent on every new connection, and how many
    /// replies they get.
    setup: Vec<u8>,
    setup_replies: usize,
    response_timeout: Duration,
    connection_timeout: Duration,
    stream: Option<TcpStream>,
    out: Vec<u8>,
    buf: ReadBuf,
}

impl Link {
    /// A link for `target` when it is one Redis over TCP, else `None`.
    pub(crate) fn for_target(
        target: &Target,
        response_timeout: Duration,
        connection_timeout: Duration,
    ) -> Option<Self> {
        let Target::Single(url) = target else {
            return None;
        };
        let info: redis::ConnectionInfo = url.parse().ok()?;
        let ConnectionAddr::Tcp(host, port) = info.addr else {
            return None;
        };
        let mut setup = Vec::new();
        let mut setup_replies = 0;
        if let Some(password) = &info.redis.password {
            let mut auth: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(user) = &info.redis.username {
                auth.push(user.as_bytes());
            }
            auth.push(password.as_bytes());
            encode(&mut setup, &auth);
            setup_replies += 1;
        }
        if info.redis.db != 0 {
            encode(
                &mut setup,
                &[b"SELECT", info.redis.db.to_string().as_bytes()],
            );
            setup_replies += 1;
        }
        // A connection is used once the server has answered on it: a server that
        // accepts connections but does not run (stopped, hung) fails the connect, and
        // the call is certainly not sent, as with the shared client's handshake.
        if setup_replies == 0 {
            encode(&mut setup, &[b"PING"]);
            setup_replies += 1;
        }
        Some(Self {
            host,
            port,
            setup,
            setup_replies,
            response_timeout,
            connection_timeout,
            stream: None,
            out: Vec::with_capacity(4096),
            buf: ReadBuf::new(),
        })
    }

    /// Runs `call` (`EVALSHA`, or `EVAL` where the script is missing) and returns its
    /// reply as integers.
    pub(crate) async fn invoke(&mut self, call: &Call<'_>) -> Result<Vec<i64>, HotError> {
        self.ensure_connected().await?;
        let mut eval = false;
        loop {
            self.out.clear();
            call.write_resp(eval, &mut self.out);
            match tokio::time::timeout(self.response_timeout, self.round_trip()).await {
                Ok(Ok(Reply::Ints(v))) => return Ok(v),
                Ok(Ok(Reply::Other(end))) => {
                    let r = redis::parse_redis_value(&self.buf.data()[..end])
                        .and_then(|v| v.extract_error())
                        .and_then(|v| Vec::<i64>::from_redis_value(&v));
                    self.buf.consume(end);
                    match r {
                        Ok(v) => return Ok(v),
                        Err(e) if e.kind() == redis::ErrorKind::NoScriptError && !eval => {
                            eval = true;
                        }
                        Err(e) => return Err(fail(&e)),
                    }
                }
                Ok(Err(e)) => {
                    self.stream = None;
                    return Err(ambiguous(format!(
                        "the connection to Redis broke with a call in flight: {e}"
                    )));
                }
                Err(_) => {
                    self.stream = None;
                    return Err(ambiguous(
                        "no answer from Redis within the response timeout".into(),
                    ));
                }
            }
        }
    }

    /// A connection that is open as far as this side can tell: one the server closed
    /// while idle (end-of-file), broke, or sent something unasked on is replaced.
    async fn ensure_connected(&mut self) -> Result<(), HotError> {
        if let Some(stream) = &self.stream {
            let mut probe = [0u8; 1];
            match stream.try_read(&mut probe) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && self.buf.is_empty() => {
                    return Ok(())
                }
                _ => self.stream = None,
            }
        }
        self.connect().await
    }

    /// Opens a new connection (`AUTH`/`SELECT` or `PING` answered), replacing any.
    /// The store connects its lanes when it starts, so a call finds its connection
    /// open; one broken later is opened again by the next call.
    pub(crate) async fn connect(&mut self) -> Result<(), HotError> {
        self.stream = None;
        self.buf.clear();
        let connect = async {
            let stream = TcpStream::connect((self.host.as_str(), self.port)).await?;
            stream.set_nodelay(true)?;
            write_all(&stream, &self.setup).await?;
            for _ in 0..self.setup_replies {
                let end = self.buf.read_value(&stream).await?;
                let r = redis::parse_redis_value(&self.buf.data()[..end])
                    .and_then(|v| v.extract_error());
                self.buf.consume(end);
                r.map_err(|e| io::Error::other(format!("the connection's setup failed: {e}")))?;
            }
            Ok::<_, io::Error>(stream)
        };
        match tokio::time::timeout(self.connection_timeout, connect).await {
            Ok(Ok(stream)) => {
                self.stream = Some(stream);
                Ok(())
            }
            Ok(Err(e)) => Err(unreachable(format!("connecting to Redis failed: {e}"))),
            Err(_) => Err(unreachable(
                "connecting to Redis failed: no connection within the connection timeout".into(),
            )),
        }
    }

    /// Writes `out` and reads one reply into `buf`.
    async fn round_trip(&mut self) -> io::Result<Reply> {
        let Some(stream) = &self.stream else {
            return Err(io::Error::from(io::ErrorKind::NotConnected));
        };
        write_all(stream, &self.out).await?;
        let end = self.buf.read_value(stream).await?;
        match ints(&self.buf.data()[..end]) {
            Some(v) => {
                self.buf.consume(end);
                Ok(Reply::Ints(v))
            }
            None => Ok(Reply::Other(end)),
        }
    }
}

/// A reply: an array of integers, or something else that ends at this offset of the
/// buffer (an error, or a shape parsed by the client's general parser).
enum Reply {
    Ints(Vec<i64>),
    Other(usize),
}

fn ambiguous(text: String) -> HotError {
    metrics::counter!(m::ERRORS, "kind" => "ambiguous").increment(1);
    HotError::Ambiguous(text)
}

fn unreachable(text: String) -> HotError {
    metrics::counter!(m::ERRORS, "kind" => "unreachable").increment(1);
    HotError::Unreachable(text)
}

async fn write_all(stream: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match stream.try_write(bytes) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Bytes read from the connection and not yet consumed: `bytes[..filled]`. (Zeroed
/// once when it grows, not before every read.)
struct ReadBuf {
    bytes: Vec<u8>,
    filled: usize,
}

impl ReadBuf {
    fn new() -> Self {
        Self {
            bytes: vec![0; 4096],
            filled: 0,
        }
    }

    fn data(&self) -> &[u8] {
        &self.bytes[..self.filled]
    }

    fn is_empty(&self) -> bool {
        self.filled == 0
    }

    fn clear(&mut self) {
        self.filled = 0;
    }

    /// Drops the first `n` bytes (one consumed value).
    fn consume(&mut self, n: usize) {
        self.bytes.copy_within(n..self.filled, 0);
        self.filled -= n;
    }

    /// Reads until it holds one whole value; returns where it ends.
    async fn read_value(&mut self, stream: &TcpStream) -> io::Result<usize> {
        loop {
            if let Some(end) = frame(self.data(), 0)? {
                return Ok(end);
            }
            if self.filled == self.bytes.len() {
                self.bytes.resize(self.bytes.len() * 2, 0);
            }
            match stream.try_read(&mut self.bytes[self.filled..]) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                Ok(n) => self.filled += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.readable().await?,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Appends a command (an array of bulk strings) in RESP.
pub(crate) fn encode(out: &mut Vec<u8>, parts: &[&[u8]]) {
    header(out, b'*', parts.len());
    for p in parts {
        bulk(out, p);
    }
}

/// `n` in decimal: the digits are `.0[.1..]`.
fn decimal(mut n: usize) -> ([u8; 20], usize) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b"0123456789"[n % 10];
        n /= 10;
        if n == 0 {
            break;
        }
    }
    (digits, at)
}

/// A type byte, a length in decimal, CRLF.
pub(crate) fn header(out: &mut Vec<u8>, kind: u8, n: usize) {
    let (digits, at) = decimal(n);
    out.push(kind);
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

/// A number as a bulk string (written without a temporary `String`).
pub(crate) fn bulk_number(out: &mut Vec<u8>, n: usize) {
    let (digits, at) = decimal(n);
    bulk(out, &digits[at..]);
}

pub(crate) fn bulk(out: &mut Vec<u8>, bytes: &[u8]) {
    header(out, b'$', bytes.len());
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

/// The line starting at `at` (without its CRLF) and where the next begins, or `None`
/// while incomplete.
fn line(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let rest = buf.get(at..)?;
    let n = rest.windows(2).position(|w| w == b"\r\n")?;
    Some((&rest[..n], at + n + 2))
}

fn number(digits: &[u8]) -> io::Result<i64> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed reply from Redis"))
}

/// Where the RESP2 value starting at `at` ends, `None` while incomplete; an error for
/// bytes that are not RESP2.
fn frame(buf: &[u8], at: usize) -> io::Result<Option<usize>> {
    let Some((head, next)) = line(buf, at) else {
        return Ok(None);
    };
    let Some((&kind, body)) = head.split_first() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "empty line from Redis",
        ));
    };
    match kind {
        b'+' | b'-' | b':' => Ok(Some(next)),
        b'$' => {
            let len = number(body)?;
            if len < 0 {
                return Ok(Some(next));
            }
            let end = usize::try_from(len)
                .unwrap_or(usize::MAX)
                .saturating_add(next)
                .saturating_add(2);
            Ok((buf.len() >= end).then_some(end))
        }
        b'*' => {
            let mut end = next;
            for _ in 0..number(body)?.max(0) {
                match frame(buf, end)? {
                    Some(e) => end = e,
                    None => return Ok(None),
                }
            }
            Ok(Some(end))
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a reply Redis should not send on this connection",
        )),
    }
}

/// The value (one whole frame) as integers when it is an array of integers.
fn ints(value: &[u8]) -> Option<Vec<i64>> {
    let (head, mut at) = line(value, 0)?;
    let n = head.strip_prefix(b"*").map(number)?.ok()?;
    let mut v = Vec::with_capacity(usize::try_from(n).ok()?);
    for _ in 0..n {
        let (item, next) = line(value, at)?;
        v.push(item.strip_prefix(b":").map(number)?.ok()?);
        at = next;
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_found_whole_or_not_at_all() {
        let reply = b"*3\r\n:1\r\n:-2\r\n$3\r\nabc\r\n";
        for cut in 0..reply.len() {
            assert_eq!(frame(&reply[..cut], 0).unwrap(), None, "cut at {cut}");
        }
        assert_eq!(frame(reply, 0).unwrap(), Some(reply.len()));
        let whole = b"*3\r\n:1\r\n:-2\r\n$3\r\nabc\r\n+OK\r\n";
        assert_eq!(frame(whole, 0).unwrap(), Some(whole.len() - 5));
        assert_eq!(frame(b"$-1\r\n", 0).unwrap(), Some(5));
        assert_eq!(frame(b"$9223372036854775807\r\nab", 0).unwrap(), None);
        assert_eq!(frame(b"*0\r\n", 0).unwrap(), Some(4));
        assert_eq!(frame(b"-ERR no\r\n", 0).unwrap(), Some(9));
        assert!(frame(b"%1\r\n", 0).is_err());
        assert!(frame(b"*x\r\n", 0).is_err());
    }

    #[test]
    fn arrays_of_integers_are_read_directly_and_anything_else_is_not() {
        assert_eq!(
            ints(b"*3\r\n:1\r\n:-2\r\n:9007199254740991\r\n"),
            Some(vec![1, -2, (1 << 53) - 1])
        );
        assert_eq!(ints(b"*0\r\n"), Some(vec![]));
        assert_eq!(ints(b"*1\r\n$1\r\n1\r\n"), None);
        assert_eq!(ints(b"-NOSCRIPT No matching script\r\n"), None);
    }

    #[test]
    fn errors_keep_the_kind_the_client_gives_them() {
        let e = redis::parse_redis_value(b"-NOSCRIPT No matching script.\r\n")
            .and_then(|v| v.extract_error())
            .unwrap_err();
        assert_eq!(e.kind(), redis::ErrorKind::NoScriptError);
        let e = redis::parse_redis_value(b"-LOADING Redis is loading\r\n")
            .and_then(|v| v.extract_error())
            .unwrap_err();
        assert!(matches!(fail(&e), HotError::Unreachable(_)));
    }

    #[test]
    fn commands_are_encoded_as_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        encode(&mut out, &[b"SELECT", b"1"]);
        assert_eq!(out, b"*2\r\n$6\r\nSELECT\r\n$1\r\n1\r\n");
        out.clear();
        header(&mut out, b'$', 0);
        header(&mut out, b'*', 1234567890);
        assert_eq!(out, b"$0\r\n*1234567890\r\n");
        out.clear();
        bulk_number(&mut out, 0);
        bulk_number(&mut out, 17);
        assert_eq!(out, b"$1\r\n0\r\n$2\r\n17\r\n");
    }

    #[test]
    fn links_are_made_for_one_redis_over_tcp_only() {
        let t = Duration::from_millis(1);
        let one = Target::Single("redis://:pw@127.0.0.1:6379/2".into());
        let link = Link::for_target(&one, t, t).unwrap();
        assert_eq!(
            (link.host.as_str(), link.port, link.setup_replies),
            ("127.0.0.1", 6379, 2)
        );
        let cluster = Target::Cluster(vec!["redis://127.0.0.1:7000".into()]);
        assert!(Link::for_target(&cluster, t, t).is_none());
        let plain = Link::for_target(&Target::Single("redis://127.0.0.1:6379".into()), t, t);
        assert_eq!(plain.unwrap().setup, b"*1\r\n$4\r\nPING\r\n");
        assert!(
            Link::for_target(&Target::Single("redis+unix:///tmp/r.sock".into()), t, t).is_none()
        );
    }
}
