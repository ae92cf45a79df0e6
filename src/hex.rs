//! Lowercase hex of bytes: how the digests and salts tokend writes (state files,
//! etcd paths, Secret names) are spelled. Parsing hex (the cluster key) is the config's.

/// `bytes` as lowercase hex, two digits a byte.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn two_lowercase_digits_a_byte() {
        assert_eq!(super::hex(&[0x00, 0x0a, 0xff, 0x7f]), "000aff7f");
        assert_eq!(super::hex(&[]), "");
    }
}
