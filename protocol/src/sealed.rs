//! Sealed quiz results (SPEC Q3): a viewer's verdict is pushed right after judging, but
//! encrypted with the question's random key, which is broadcast only with the answer.
//!
//! Better than the source's XOR: ChaCha20-Poly1305 (RFC 8439, via `ring`). The key is 32
//! random bytes per question. The nonce is the first 12 bytes of SHA-256 over
//! `quiz_id 0x00 k user`, unique per viewer and question, so one key never sees a nonce
//! twice. The same string is the associated data: a sealed result opens only for its own
//! show, question and viewer. Without the key nothing about the verdict can be read; the
//! tag detects any change.
//!
//! A verdict is sealed padded to [`VERDICT_BYTES`] (its snake_case name, then zero bytes),
//! so every sealed verdict has the same length: the length says nothing either. On the
//! wire, keys and sealed verdicts are lowercase hex strings.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};

use crate::error::ProtocolError;

/// Bytes of a question key.
pub const SEAL_KEY_BYTES: usize = 32;

fn context(quiz_id: &str, k: u32, user: &str) -> Vec<u8> {
    let mut context = Vec::with_capacity(quiz_id.len() + user.len() + 5);
    context.extend_from_slice(quiz_id.as_bytes());
    context.push(0);
    context.extend_from_slice(&k.to_be_bytes());
    context.extend_from_slice(user.as_bytes());
    context
}

fn nonce_and_key(
    key: &[u8; SEAL_KEY_BYTES],
    context: &[u8],
) -> Result<(Nonce, LessSafeKey), ProtocolError> {
    let digest = ring::digest::digest(&ring::digest::SHA256, context);
    let nonce = Nonce::try_assume_unique_for_key(&digest.as_ref()[..12])
        .map_err(|_| ProtocolError::Encode("nonce".into()))?;
    let key = UnboundKey::new(&CHACHA20_POLY1305, key)
        .map_err(|_| ProtocolError::Encode("seal key".into()))?;
    Ok((nonce, LessSafeKey::new(key)))
}

/// Seals `plaintext` for `user`'s answer to question `k` of `quiz_id`.
///
/// # Errors
///
/// [`ProtocolError::Encode`] only if the crypto library refuses (it does not for these
/// sizes).
pub fn seal(
    key: &[u8; SEAL_KEY_BYTES],
    quiz_id: &str,
    k: u32,
    user: &str,
    plaintext: &[u8],
) -> Result<Vec<u8>, ProtocolError> {
    let context = context(quiz_id, k, user);
    let (nonce, key) = nonce_and_key(key, &context)?;
    let mut sealed = plaintext.to_vec();
    key.seal_in_place_append_tag(nonce, Aad::from(&context), &mut sealed)
        .map_err(|_| ProtocolError::Encode("seal".into()))?;
    Ok(sealed)
}

/// Opens what [`seal`] made, with the key from the announcement.
///
/// # Errors
///
/// [`ProtocolError::Malformed`] if the key, show, question or viewer is not the one it
/// was sealed for, or the bytes were changed.
pub fn open(
    key: &[u8; SEAL_KEY_BYTES],
    quiz_id: &str,
    k: u32,
    user: &str,
    sealed: &[u8],
) -> Result<Vec<u8>, ProtocolError> {
    let context = context(quiz_id, k, user);
    let (nonce, key) = nonce_and_key(key, &context)?;
    let mut buffer = sealed.to_vec();
    let plaintext = key
        .open_in_place(nonce, Aad::from(&context), &mut buffer)
        .map_err(|_| {
            ProtocolError::Malformed("the sealed result does not open with this key".into())
        })?;
    Ok(plaintext.to_vec())
}

/// Bytes a verdict is padded to before sealing (sealed: this plus the 16-byte tag).
pub const VERDICT_BYTES: usize = 16;

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        hex.push(char::from(DIGITS[usize::from(byte >> 4)]));
        hex.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    hex
}

/// The bytes of a hex string (either case).
///
/// # Errors
///
/// [`ProtocolError::Malformed`] for an odd length or a character that is not a hex digit.
pub fn from_hex(hex: &str) -> Result<Vec<u8>, ProtocolError> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(ProtocolError::Malformed("not a hex digit".into())),
    };
    let bytes = hex.as_bytes();
    if !bytes.len().is_multiple_of(2) {
        return Err(ProtocolError::Malformed("odd hex length".into()));
    }
    bytes
        .chunks_exact(2)
        .map(|pair| Ok((digit(pair[0])? << 4) | digit(pair[1])?))
        .collect()
}

/// Seals the verdict named `verdict` (at most [`VERDICT_BYTES`] bytes), padded; returns
/// hex.
///
/// # Errors
///
/// [`ProtocolError::Encode`] for a name that is too long.
pub fn seal_verdict(
    key: &[u8; SEAL_KEY_BYTES],
    quiz_id: &str,
    k: u32,
    user: &str,
    verdict: &str,
) -> Result<String, ProtocolError> {
    if verdict.len() > VERDICT_BYTES {
        return Err(ProtocolError::Encode("verdict name too long".into()));
    }
    let mut padded = [0u8; VERDICT_BYTES];
    padded[..verdict.len()].copy_from_slice(verdict.as_bytes());
    seal(key, quiz_id, k, user, &padded).map(|sealed| to_hex(&sealed))
}

/// Opens a sealed verdict (hex) with the announced key (hex): the verdict's name
/// (`correct`, `revived`, `wrong`, `late`).
///
/// # Errors
///
/// [`ProtocolError::Malformed`] if either is not hex, the key is not 32 bytes, or the
/// verdict does not open with it for this show, question and viewer.
pub fn open_verdict(
    key_hex: &str,
    quiz_id: &str,
    k: u32,
    user: &str,
    sealed_hex: &str,
) -> Result<String, ProtocolError> {
    let key: [u8; SEAL_KEY_BYTES] = from_hex(key_hex)?
        .try_into()
        .map_err(|_| ProtocolError::Malformed("a quiz key has 32 bytes".into()))?;
    let plaintext = open(&key, quiz_id, k, user, &from_hex(sealed_hex)?)?;
    let end = plaintext
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(plaintext.len());
    String::from_utf8(plaintext[..end].to_vec())
        .map_err(|_| ProtocolError::Malformed("the verdict is not text".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_verdicts_have_one_length_and_open_by_hex() {
        let key = [9u8; SEAL_KEY_BYTES];
        let right = seal_verdict(&key, "q", 0, "ann", "correct").expect("seal");
        let wrong = seal_verdict(&key, "q", 0, "ann", "wrong").expect("seal");
        assert_eq!(right.len(), wrong.len(), "the length says nothing");
        assert_eq!(
            open_verdict(&to_hex(&key), "q", 0, "ann", &wrong).expect("open"),
            "wrong"
        );
        assert!(open_verdict(&to_hex(&[1u8; 32]), "q", 0, "ann", &wrong).is_err());
        assert!(open_verdict("zz", "q", 0, "ann", &wrong).is_err());
        assert_eq!(from_hex("00fF").expect("hex"), vec![0, 255]);
    }

    #[test]
    fn a_sealed_result_opens_only_with_its_key_for_its_viewer() {
        let key = [7u8; SEAL_KEY_BYTES];
        let sealed = seal(&key, "quiz-1", 3, "ann", b"correct").expect("seal");
        assert!(
            !sealed.windows(7).any(|w| w == b"correct"),
            "not readable as is"
        );
        assert_eq!(
            open(&key, "quiz-1", 3, "ann", &sealed).expect("open"),
            b"correct"
        );
        assert!(open(&[8u8; SEAL_KEY_BYTES], "quiz-1", 3, "ann", &sealed).is_err());
        assert!(
            open(&key, "quiz-1", 3, "bob", &sealed).is_err(),
            "another viewer's"
        );
        assert!(
            open(&key, "quiz-1", 4, "ann", &sealed).is_err(),
            "another question's"
        );
        let mut changed = sealed.clone();
        changed[0] ^= 1;
        assert!(open(&key, "quiz-1", 3, "ann", &changed).is_err());
        // Same verdict, different viewers: different bytes.
        assert_ne!(
            sealed,
            seal(&key, "quiz-1", 3, "bob", b"correct").expect("seal")
        );
    }
}
