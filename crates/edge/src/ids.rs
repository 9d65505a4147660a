//! Random identifiers for sessions and nodes.

use rand::Rng as _;

/// `prefix` + 16 random base-32 characters (80 bits): unguessable enough to
/// be used in exclusions and presence without leaking a counter.
pub(crate) fn random_id(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefghjkmnpqrstvwxyz";
    let mut rng = rand::rng();
    let mut out = String::with_capacity(prefix.len() + 17);
    out.push_str(prefix);
    out.push('_');
    for _ in 0..16 {
        out.push(ALPHABET[rng.random_range(0..ALPHABET.len())] as char);
    }
    out
}
