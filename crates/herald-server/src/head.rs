//! The first request head of every connection, read and checked by the accept loop before anyone else
//! sees it: its end (every line ending with CRLF), its size, its message framing (RFC 9112 section 6),
//! and whether it is an event stream (`GET /v1/sse`, served without hyper). Knows bytes, `httparse` and
//! `error.rs`; nothing of routes or sessions.

use axum::http::HeaderMap;
use tokio::io::AsyncReadExt;

use crate::error::ApiError;
use crate::socket::GuardedIo;

/// How reading a request head ended.
pub enum Head {
    Complete,
    /// The client closed the connection first.
    Closed,
    TooLarge,
    /// A line of the head ends with a bare LF (or holds a bare CR): refused at once rather than waiting
    /// for a CRLF CRLF that never comes. RFC 9112 allows a server to accept bare LF; Herald does not, so
    /// that it never reads a request's framing differently from a proxy in front of it.
    BareLineEnd,
}

/// Reads until the end of the request head (`\r\n\r\n`), at most `max` bytes of it.
pub async fn read_head(io: &mut GuardedIo, head: &mut Vec<u8>, max: usize) -> std::io::Result<Head> {
    let mut scanned = 0;
    loop {
        // Read straight into the (heap) head buffer: a stack buffer here would become part of every
        // connection task's size for the connection's whole life.
        head.reserve(1024);
        let read = io.read_buf(head).await?;
        if read == 0 {
            return Ok(Head::Closed);
        }
        match scan_head(head, scanned) {
            Scan::End(head_len) => return Ok(if head_len > max { Head::TooLarge } else { Head::Complete }),
            Scan::BareLineEnd => return Ok(Head::BareLineEnd),
            Scan::Partial(next) => scanned = next,
        }
        if head.len() > max {
            return Ok(Head::TooLarge);
        }
    }
}

/// Where scanning a request head for its end stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Scan {
    /// The head is complete and this long (bytes after it belong to the body).
    End(usize),
    /// Not complete yet; scan again from this index once more bytes arrived.
    Partial(usize),
    BareLineEnd,
}

/// Scans `head` from `from` for the blank line that ends it, checking that every line ends with CRLF.
/// Bytes after the head (a body) are not looked at.
pub fn scan_head(head: &[u8], from: usize) -> Scan {
    for index in from..head.len() {
        match head[index] {
            b'\n' => {
                if index == 0 || head[index - 1] != b'\r' {
                    return Scan::BareLineEnd;
                }
                if index >= 3 && &head[index - 3..=index] == b"\r\n\r\n" {
                    return Scan::End(index + 1);
                }
            }
            b'\r' => match head.get(index + 1) {
                Some(b'\n') => {}
                Some(_) => return Scan::BareLineEnd,
                None => return Scan::Partial(index),
            },
            _ => {}
        }
    }
    Scan::Partial(head.len())
}

/// Who serves a complete request head.
pub enum Request {
    /// `GET /v1/sse` (not an upgrade): its headers and query.
    Sse(HeaderMap, Option<String>),
    /// Anything else well-formed: hyper and the router.
    Other,
}

/// Most header lines a request may carry.
pub const MAX_HEADERS: usize = 64;

/// Parses a complete request head and checks its message framing (RFC 9112 section 6) before anyone
/// else sees it, so that each malformed request gets the contract's JSON error (hyper would answer an
/// empty 400) and a body over the limit is refused before it is read.
pub fn classify(head: &[u8], max_body_bytes: usize) -> Result<Request, ApiError> {
    let malformed = || ApiError::BadRequest("malformed HTTP request".into());
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut slots);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(malformed()),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ApiError::HeadersTooLarge(format!("a request may carry at most {MAX_HEADERS} header lines")));
        }
        Err(_) => return Err(malformed()),
    }
    let (Some(method), Some(path), Some(version)) = (request.method, request.path, request.version) else {
        return Err(malformed());
    };
    let has_body = check_framing(request.headers, version, max_body_bytes)?;
    let (route, query) = match path.split_once('?') {
        Some((route, query)) => (route, Some(query)),
        None => (path, None),
    };
    if method != "GET" || route != "/v1/sse" {
        return Ok(Request::Other);
    }
    let mut headers = HeaderMap::new();
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("upgrade") {
            return Ok(Request::Other);
        }
        let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::from_bytes(header.name.as_bytes()),
            axum::http::HeaderValue::from_bytes(header.value),
        ) else {
            return Err(malformed());
        };
        headers.append(name, value);
    }
    if has_body {
        // The stream would read the body as the client going away.
        return Err(ApiError::BadRequest("an event stream request has no body".into()));
    }
    Ok(Request::Sse(headers, query.map(str::to_owned)))
}

/// Checks `Content-Length` and `Transfer-Encoding` (RFC 9112 sections 6.1 to 6.3): one well-formed
/// length, or `chunked` as the only coding (a list without empty elements), never both (the classic
/// request smuggling vector), no transfer coding in HTTP/1.0, and a length within `max_body_bytes`.
/// Returns whether a body follows.
fn check_framing(headers: &[httparse::Header<'_>], version: u8, max_body_bytes: usize) -> Result<bool, ApiError> {
    let mut length: Option<u64> = None;
    let mut codings: Vec<String> = Vec::new();
    let mut has_transfer_encoding = false;
    for header in headers {
        if header.name.eq_ignore_ascii_case("content-length") {
            if length.is_some() {
                return Err(ApiError::BadRequest("Content-Length given more than once".into()));
            }
            let value = header.value.trim_ascii();
            if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
                return Err(ApiError::BadRequest("Content-Length must be a non-negative decimal number".into()));
            }
            // Every byte is a digit: only overflow can fail, and such a length is over any limit.
            length = Some(std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()).unwrap_or(u64::MAX));
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            has_transfer_encoding = true;
            let value = std::str::from_utf8(header.value)
                .map_err(|_| ApiError::BadRequest("Transfer-Encoding must be ASCII".into()))?;
            for coding in value.split(',').map(str::trim) {
                // hyper refuses an empty element at the end (`chunked,`); refusing every empty one here
                // keeps the two parses from ever disagreeing on where the body ends.
                if coding.is_empty() {
                    return Err(ApiError::BadRequest("Transfer-Encoding has an empty list element".into()));
                }
                codings.push(coding.to_ascii_lowercase());
            }
        }
    }
    if has_transfer_encoding {
        if length.is_some() {
            return Err(ApiError::BadRequest(
                "a request may not carry both Content-Length and Transfer-Encoding".into(),
            ));
        }
        if version == 0 {
            return Err(ApiError::BadRequest("HTTP/1.0 requests may not use Transfer-Encoding".into()));
        }
        if codings.last().map(String::as_str) != Some("chunked") {
            return Err(ApiError::BadRequest("chunked must be the final transfer coding of a request".into()));
        }
        if codings.len() > 1 {
            let unknown = codings.iter().find(|c| *c != "chunked").map(String::as_str).unwrap_or("chunked");
            return Err(if unknown == "chunked" {
                ApiError::BadRequest("chunked may be applied only once".into())
            } else {
                ApiError::NotImplemented(format!("transfer coding {unknown:?} is not supported; use chunked"))
            });
        }
        return Ok(true);
    }
    match length {
        Some(length) if length > max_body_bytes as u64 => Err(ApiError::BodyTooLarge { limit: max_body_bytes }),
        Some(length) => Ok(length > 0),
        None => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_ends_at_its_blank_line_and_every_line_needs_crlf() {
        assert_eq!(scan_head(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n{\"a\":\n1}", 0), Scan::End(27));
        assert_eq!(scan_head(b"GET / HTTP/1.1\r\nHost: x\r", 0), Scan::Partial(23));
        assert_eq!(scan_head(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 23), Scan::End(27));
        for bad in [&b"GET / HTTP/1.1\nHost: x\n\n"[..], b"GET / HTTP/1.1\r\nHost: x\n", b"GET / HTTP/1.1\rHost: x"] {
            assert_eq!(scan_head(bad, 0), Scan::BareLineEnd, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn framing_is_checked_before_anyone_reads_a_body() {
        let check = |head: &str| match classify(head.as_bytes(), 100) {
            Ok(Request::Sse(..)) => "sse".to_owned(),
            Ok(Request::Other) => "other".to_owned(),
            Err(error) => format!("{} {}", error.status().as_u16(), error.code()),
        };
        let cases = [
            ("POST /v1/publish HTTP/1.1\r\nContent-Length: 10\r\n\r\n", "other"),
            ("POST /v1/publish HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n", "other"),
            ("GET /v1/sse?channel=a HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "sse"),
            ("GET /v1/sse?channel=a HTTP/1.1\r\nContent-Length: 1\r\n\r\n", "400 bad_request"),
            ("POST /v1/publish HTTP/1.1\r\nContent-Length: 101\r\n\r\n", "413 body_too_large"),
            ("POST /v1/publish HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n", "413 body_too_large"),
            ("POST /v1/publish HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "400 bad_request"),
            ("POST /v1/publish HTTP/1.1\r\nContent-Length: +1\r\n\r\n", "400 bad_request"),
            ("POST /v1/publish HTTP/1.1\r\nContent-Length: 1,1\r\n\r\n", "400 bad_request"),
            ("POST /v1/publish HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n", "400 bad_request"),
            ("POST /v1/publish HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", "400 bad_request"),
            ("POST /v1/publish HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "501 not_implemented"),
            ("POST /v1/publish HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", "400 bad_request"),
            ("POST /v1/publish HTTP/1.1\r\nTransfer-Encoding: foo\r\n\r\n", "400 bad_request"),
            ("POST /v1/publish HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", "400 bad_request"),
            ("POST /v1/publish HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", "400 bad_request"),
        ];
        for (head, expected) in cases {
            assert_eq!(check(head), expected, "{head:?}");
        }
    }
}
