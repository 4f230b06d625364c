//! Sans-IO protocol detection from a connection's first bytes: TLS, HTTP/2 preface, HTTP/1.x,
//! or something else (then forwarded as opaque TCP).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detection {
    /// Not enough bytes to decide yet.
    NeedMore,
    Tls,
    /// The HTTP/2 connection preface: h2c with prior knowledge.
    Http2,
    Http1,
    Other,
}

const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Request methods recognised as the start of an HTTP/1.x request line.
const METHODS: [&[u8]; 9] = [b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE "];

/// Classify the bytes received so far.
pub fn classify(bytes: &[u8]) -> Detection {
    if bytes.is_empty() {
        return Detection::NeedMore;
    }
    // A TLS handshake record: content type 22, then major version 3.
    if bytes[0] == 0x16 {
        return match bytes.get(1) {
            None => Detection::NeedMore,
            Some(3) => Detection::Tls,
            Some(_) => Detection::Other,
        };
    }
    let compared = bytes.len().min(HTTP2_PREFACE.len());
    if bytes[..compared] == HTTP2_PREFACE[..compared] {
        // "PRI " is only ever the HTTP/2 preface; wait for all of it.
        return if compared == HTTP2_PREFACE.len() { Detection::Http2 } else { Detection::NeedMore };
    }
    let mut could_still_match = false;
    for method in METHODS {
        let n = bytes.len().min(method.len());
        if bytes[..n] == method[..n] {
            if n == method.len() {
                return Detection::Http1;
            }
            could_still_match = true;
        }
    }
    if could_still_match {
        Detection::NeedMore
    } else {
        Detection::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_each_kind() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Detection::Http1);
        assert_eq!(classify(b"OPTIONS * HTTP/1.1\r\n"), Detection::Http1);
        assert_eq!(classify(HTTP2_PREFACE), Detection::Http2);
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x02, 0x00]), Detection::Tls);
        assert_eq!(classify(b"HELLO\n"), Detection::Other);
        assert_eq!(classify(b"\x00\x01"), Detection::Other);
    }

    #[test]
    fn waits_for_ambiguous_prefixes() {
        assert_eq!(classify(b""), Detection::NeedMore);
        assert_eq!(classify(b"GE"), Detection::NeedMore);
        assert_eq!(classify(b"PRI * HTTP/2"), Detection::NeedMore);
        assert_eq!(classify(b"P"), Detection::NeedMore);
        assert_eq!(classify(&[0x16]), Detection::NeedMore);
    }

    #[test]
    fn lowercase_or_unknown_methods_are_not_http() {
        assert_eq!(classify(b"get / HTTP/1.1\r\n"), Detection::Other);
        assert_eq!(classify(b"GETX / HTTP/1.1\r\n"), Detection::Other);
    }
}
