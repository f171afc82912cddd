//! The `application/x-www-form-urlencoded` encoding of refresh bodies and
//! of the key the Warp preset puts in its refresh URL.

/// Appends `value` in `application/x-www-form-urlencoded` form (refresh
/// bodies, and the key the Warp preset puts in its refresh URL).
pub(crate) fn form_encode(value: &str, out: &mut String) {
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                out.push('%');
                out.push(HEX[usize::from(b >> 4)] as char);
                out.push(HEX[usize::from(b & 15)] as char);
            }
        }
    }
}
