//! Values as the proxy's log lines show them, formatted straight into the line.

use std::{fmt, net::SocketAddr};

/// A value, or `-` for none, as the access log shows it.
pub struct OrDash<T>(pub Option<T>);

impl<T: fmt::Display> fmt::Display for OrDash<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(value) => value.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// A socket address, written as its `Display` writes it. An IPv4 address, which is what a
/// cluster's pods and Services have, is put together in a buffer and written once: the
/// standard library formats each octet and the port through `core::fmt` on its own, and every
/// access-log line holds three addresses.
#[derive(Clone, Copy)]
pub struct Addr(pub SocketAddr);

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let SocketAddr::V4(v4) = self.0 else {
            return self.0.fmt(f);
        };
        if f.width().is_some() || f.precision().is_some() {
            return self.0.fmt(f);
        }
        // The longest is 255.255.255.255:65535.
        let mut text = [0u8; 21];
        let mut len = 0;
        for (i, octet) in v4.ip().octets().into_iter().enumerate() {
            if i > 0 {
                text[len] = b'.';
                len += 1;
            }
            len += put_decimal(&mut text[len..], octet.into());
        }
        text[len] = b':';
        len += 1;
        len += put_decimal(&mut text[len..], v4.port());
        f.write_str(std::str::from_utf8(&text[..len]).map_err(|_| fmt::Error)?)
    }
}

/// Writes `value` in decimal at the start of `out` and returns how many digits it took.
fn put_decimal(out: &mut [u8], value: u16) -> usize {
    let digits = match value {
        0..10 => 1,
        10..100 => 2,
        100..1000 => 3,
        1000..10000 => 4,
        _ => 5,
    };
    let mut rest = value;
    for digit in out[..digits].iter_mut().rev() {
        *digit = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    digits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_read_as_the_standard_library_writes_them() {
        let addresses = [
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.96.0.11:80",
            "127.217.1.1:50087",
            "1.22.103.9:9",
            "100.64.10.200:10000",
            "[fd00::1]:80",
            "[::ffff:10.0.0.1]:443",
        ];
        for text in addresses {
            let addr: SocketAddr = text.parse().unwrap();
            assert_eq!(Addr(addr).to_string(), text);
            assert_eq!(Addr(addr).to_string(), addr.to_string());
            assert_eq!(format!("{:>24}", Addr(addr)), format!("{addr:>24}"));
        }
        for port in [1, 9, 10, 99, 100, 999, 1000, 9999, 10000, 65535] {
            let addr = SocketAddr::from(([192, 168, 0, 1], port));
            assert_eq!(Addr(addr).to_string(), addr.to_string());
        }
    }

    #[test]
    fn none_is_a_dash() {
        assert_eq!(OrDash(None::<Addr>).to_string(), "-");
        assert_eq!(OrDash(Some("x")).to_string(), "x");
    }
}
