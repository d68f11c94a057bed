//! HTTP/1.1 message boundaries on a relayed connection, found without
//! decoding or copying bodies: the relay must know where each request head
//! starts (to route it) and when each answer is complete (to tell a replica
//! that closed between two exchanges from one that died in the middle of
//! one), and nothing else.
//!
//! Heads are parsed with `httparse` (hyper's parser). A request whose
//! framing is ambiguous (both `Transfer-Encoding` and `Content-Length`, a
//! coding other than `chunked`, several lengths), an upgrade, `CONNECT` or
//! HTTP/1.0 is not relayed at all ([`RequestHead::relayable`]): the replica
//! serves it with hyper itself, so the two sides can never disagree about
//! where a request ends.

use super::MAX_HEAD_BYTES;

/// Most header lines in a head (the tunnel's limit).
const MAX_HEADERS: usize = 256;

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLen {
    /// No body.
    Empty,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// An answer without length: it ends when the connection closes.
    UntilClose,
}

/// A message the relay cannot follow.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed HTTP/1.1 message: {0}")]
pub struct Malformed(pub &'static str);

/// What a complete request head says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Bytes of the head, final empty line included.
    pub len: usize,
    /// The request target as sent (origin form).
    pub path: String,
    /// `HEAD` (its answer has no body whatever its headers say).
    pub is_head: bool,
    /// `GET`, `HEAD` or `OPTIONS` without a body: safe to send again.
    pub idempotent_bodyless: bool,
    /// Its body.
    pub body: BodyLen,
    /// Whether the relay can follow it (see the module documentation).
    pub relayable: bool,
}

/// A request head at the start of `buf`: `Ok(None)` while incomplete.
pub fn request_head(buf: &[u8]) -> Result<Option<RequestHead>, Malformed> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
            return Err(Malformed("request head too large"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(Malformed("unparsable request head")),
    };
    let method = req.method.unwrap_or("");
    let mut relayable = req.version == Some(1) && method != "CONNECT";
    let (mut length, mut chunked, mut lengths) = (None, false, 0);
    for h in req.headers.iter() {
        let v = h.value;
        if h.name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            length = std::str::from_utf8(v)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok());
            relayable &= length.is_some();
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = v.eq_ignore_ascii_case(b"chunked");
            relayable &= chunked;
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            relayable = false;
        }
    }
    // One length, or chunked alone (a second TE line also fails here).
    relayable &= lengths <= 1 && !(chunked && lengths > 0);
    let body = match (chunked, length) {
        (true, _) => BodyLen::Chunked,
        (false, Some(0)) | (false, None) => BodyLen::Empty,
        (false, Some(n)) => BodyLen::Length(n),
    };
    let idempotent = matches!(method, "GET" | "HEAD" | "OPTIONS");
    Ok(Some(RequestHead {
        len,
        path: req.path.unwrap_or("").to_string(),
        is_head: method == "HEAD",
        idempotent_bodyless: idempotent && body == BodyLen::Empty,
        body,
        relayable,
    }))
}

/// What a complete response head says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHead {
    /// Bytes of the head.
    pub len: usize,
    /// The status code.
    pub status: u16,
    /// A 1xx answer other than 101: the final one follows.
    pub interim: bool,
    /// Its body.
    pub body: BodyLen,
}

/// A response head at the start of `buf`, answering a request that was
/// (`is_head`) or was not a `HEAD`; `Ok(None)` while incomplete.
pub fn response_head(buf: &[u8], is_head: bool) -> Result<Option<ResponseHead>, Malformed> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
            return Err(Malformed("response head too large"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(Malformed("unparsable response head")),
    };
    let status = resp.code.unwrap_or(0);
    if (100..200).contains(&status) && status != 101 {
        return Ok(Some(ResponseHead {
            len,
            status,
            interim: true,
            body: BodyLen::Empty,
        }));
    }
    let (mut length, mut chunked) = (None, false);
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok());
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = h
                .value
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
    }
    let body = if is_head || status == 204 || status == 304 {
        BodyLen::Empty
    } else if status == 101 {
        BodyLen::UntilClose
    } else if chunked {
        BodyLen::Chunked
    } else {
        match length {
            Some(0) => BodyLen::Empty,
            Some(n) => BodyLen::Length(n),
            None => BodyLen::UntilClose,
        }
    };
    Ok(Some(ResponseHead {
        len,
        status,
        interim: false,
        body,
    }))
}

/// Where a chunked body stands, between calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// In a chunk-size line: the size so far, its digits, past the digits.
    Size {
        size: u64,
        digits: u8,
        ext: bool,
    },
    /// After the size line's CR.
    SizeLf {
        size: u64,
    },
    /// Inside chunk data.
    Data(u64),
    /// After chunk data: CR then LF.
    DataCr,
    DataLf,
    /// In the trailer section, at the start of a line.
    LineStart,
    /// In a trailer line.
    Line,
    /// After the CR of the final empty line.
    FinalLf,
}

/// Counts the bytes of one body as they pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyCounter(Counting);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counting {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Done,
}

impl BodyCounter {
    /// A counter for a body delimited by `len`.
    pub fn new(len: BodyLen) -> Self {
        BodyCounter(match len {
            BodyLen::Empty | BodyLen::Length(0) => Counting::Done,
            BodyLen::Length(n) => Counting::Length(n),
            BodyLen::Chunked => Counting::Chunked(Chunk::Size {
                size: 0,
                digits: 0,
                ext: false,
            }),
            BodyLen::UntilClose => Counting::UntilClose,
        })
    }

    /// Whether the body is complete.
    pub fn done(&self) -> bool {
        self.0 == Counting::Done
    }

    /// How many bytes at the start of `buf` belong to the body (all of them
    /// until it is complete; then it is [`done`](Self::done)).
    pub fn take(&mut self, buf: &[u8]) -> Result<usize, Malformed> {
        match &mut self.0 {
            Counting::Done => Ok(0),
            Counting::UntilClose => Ok(buf.len()),
            Counting::Length(left) => {
                let n = (*left).min(buf.len() as u64);
                *left -= n;
                if *left == 0 {
                    self.0 = Counting::Done;
                }
                Ok(n as usize)
            }
            Counting::Chunked(c) => {
                let mut c = *c;
                let mut i = 0;
                let mut done = false;
                while i < buf.len() && !done {
                    if let Chunk::Data(left) = c {
                        let n = left.min((buf.len() - i) as u64);
                        i += n as usize;
                        c = if n == left {
                            Chunk::DataCr
                        } else {
                            Chunk::Data(left - n)
                        };
                        continue;
                    }
                    let b = buf[i];
                    i += 1;
                    c = match (c, b) {
                        (Chunk::Size { .. }, b'\n') => {
                            return Err(Malformed("bare LF in chunk size"))
                        }
                        (Chunk::Size { size, digits, .. }, b'\r') if digits > 0 => {
                            Chunk::SizeLf { size }
                        }
                        (
                            Chunk::Size {
                                size,
                                digits,
                                ext: false,
                            },
                            _,
                        ) if b.is_ascii_hexdigit() => {
                            if digits >= 15 {
                                return Err(Malformed("chunk size too large"));
                            }
                            let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                            Chunk::Size {
                                size: size * 16 + d,
                                digits: digits + 1,
                                ext: false,
                            }
                        }
                        (Chunk::Size { size, digits, .. }, _) if digits > 0 && b != b'\r' => {
                            Chunk::Size {
                                size,
                                digits,
                                ext: true,
                            }
                        }
                        (Chunk::Size { .. }, _) => return Err(Malformed("bad chunk size")),
                        (Chunk::SizeLf { size: 0 }, b'\n') => Chunk::LineStart,
                        (Chunk::SizeLf { size }, b'\n') => Chunk::Data(size),
                        (Chunk::DataCr, b'\r') => Chunk::DataLf,
                        (Chunk::DataLf, b'\n') => Chunk::Size {
                            size: 0,
                            digits: 0,
                            ext: false,
                        },
                        (Chunk::LineStart, b'\r') => Chunk::FinalLf,
                        (Chunk::LineStart, b'\n') => return Err(Malformed("bare LF in trailer")),
                        (Chunk::Line, b'\n') => Chunk::LineStart,
                        (Chunk::LineStart | Chunk::Line, _) => Chunk::Line,
                        (Chunk::FinalLf, b'\n') => {
                            done = true;
                            c
                        }
                        _ => return Err(Malformed("bad chunk framing")),
                    };
                }
                self.0 = if done {
                    Counting::Done
                } else {
                    Counting::Chunked(c)
                };
                Ok(i)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `body` to a counter in pieces of `step` bytes; returns the
    /// bytes it took and whether it ended.
    fn count(len: BodyLen, body: &[u8], step: usize) -> (usize, bool) {
        let mut c = BodyCounter::new(len);
        let mut taken = 0;
        for piece in body.chunks(step) {
            let n = c.take(piece).expect("well formed");
            taken += n;
            if c.done() {
                break;
            }
            assert_eq!(n, piece.len(), "an unfinished body takes everything");
        }
        (taken, c.done())
    }

    #[test]
    fn chunked_bodies_end_exactly_at_their_last_byte_however_split() {
        let body =
            b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Trailer: 1\r\n\r\n";
        let mut with_next = body.to_vec();
        with_next.extend_from_slice(b"GET / HTTP/1.1\r\n");
        for step in 1..=with_next.len() {
            assert_eq!(
                count(BodyLen::Chunked, &with_next, step),
                (body.len(), true),
                "step {step}"
            );
        }
        assert_eq!(count(BodyLen::Chunked, b"0\r\n\r\n", 1), (5, true));
        assert_eq!(count(BodyLen::Chunked, b"0\r\n", 3), (3, false));
        let mut c = BodyCounter::new(BodyLen::Chunked);
        assert!(c.take(b"zz\r\n").is_err());
        let mut c = BodyCounter::new(BodyLen::Chunked);
        assert!(c.take(b"5\r\nhelloXX").is_err(), "data not ended by CRLF");
    }

    #[test]
    fn lengths_and_until_close() {
        assert_eq!(count(BodyLen::Length(3), b"abcdef", 2), (3, true));
        assert_eq!(count(BodyLen::Length(10), b"abc", 1), (3, false));
        assert!(BodyCounter::new(BodyLen::Empty).done());
        assert_eq!(count(BodyLen::UntilClose, b"abc", 1), (3, false));
    }

    #[test]
    fn request_heads() {
        let h = request_head(b"GET /gitlab/acme/api/v4/version HTTP/1.1\r\nHost: x\r\n\r\nrest")
            .unwrap()
            .unwrap();
        assert_eq!(h.path, "/gitlab/acme/api/v4/version");
        assert_eq!((h.len, h.body, h.relayable), (53, BodyLen::Empty, true));
        assert!(h.idempotent_bodyless && !h.is_head);
        assert_eq!(request_head(b"GET / HTTP/1.1\r\nHost:").unwrap(), None);
        let post = |hdrs: &str| {
            request_head(format!("POST /x HTTP/1.1\r\n{hdrs}\r\n").as_bytes())
                .unwrap()
                .unwrap()
        };
        let p = post("Content-Length: 12\r\n");
        assert_eq!(
            (p.body, p.relayable, p.idempotent_bodyless),
            (BodyLen::Length(12), true, false)
        );
        assert_eq!(
            post("Transfer-Encoding: chunked\r\n").body,
            BodyLen::Chunked
        );
        for ambiguous in [
            "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
            "Transfer-Encoding: gzip, chunked\r\n",
            "Content-Length: 3\r\nContent-Length: 3\r\n",
            "Content-Length: +3\r\n",
            "Upgrade: websocket\r\nConnection: upgrade\r\n",
        ] {
            assert!(!post(ambiguous).relayable, "{ambiguous:?}");
        }
        let old = request_head(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!old.relayable);
        assert!(request_head(b"GET / HTTP/1.1\r\nbad header\r\n\r\n").is_err());
        let big = vec![b'a'; MAX_HEAD_BYTES + 1];
        assert!(request_head(&[b"GET /".as_slice(), &big].concat()).is_err());
    }

    #[test]
    fn response_heads() {
        let r = |s: &str, head: bool| response_head(s.as_bytes(), head).unwrap().unwrap();
        assert_eq!(
            r("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", false).body,
            BodyLen::Length(5)
        );
        assert_eq!(
            r("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true).body,
            BodyLen::Empty
        );
        assert_eq!(
            r(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                false
            )
            .body,
            BodyLen::Chunked
        );
        assert_eq!(
            r("HTTP/1.1 204 No Content\r\n\r\n", false).body,
            BodyLen::Empty
        );
        assert_eq!(
            r(
                "HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n",
                false
            )
            .body,
            BodyLen::Empty
        );
        assert_eq!(
            r("HTTP/1.1 200 OK\r\n\r\n", false).body,
            BodyLen::UntilClose
        );
        let c = r("HTTP/1.1 100 Continue\r\n\r\n", false);
        assert!(c.interim && c.len == 25);
        assert_eq!(response_head(b"HTTP/1.1 200 OK\r\n", false).unwrap(), None);
    }
}
