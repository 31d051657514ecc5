//! Known-answer tests for the primitives Persist builds on, so that a
//! dependency upgrade that changes an algorithm's output is caught here.

use aes_gcm_siv::aead::AeadInOut;
use aes_gcm_siv::{Aes256GcmSiv, KeyInit};
use hkdf::Hkdf;
use sha2::Sha256;

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s.replace([' ', '\n'], "")).expect("test vector is hex")
}

/// RFC 5869, Appendix A.1 (Test Case 1) and A.3 (Test Case 3).
#[test]
fn hkdf_sha256_rfc5869() {
    let cases = [
        (
            "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
            "000102030405060708090a0b0c",
            "f0f1f2f3f4f5f6f7f8f9",
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
        ),
        (
            "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
            "",
            "",
            "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
        ),
    ];
    for (ikm, salt, info, okm) in cases {
        let salt = unhex(salt);
        let hk = Hkdf::<Sha256>::new(Some(&salt), &unhex(ikm));
        let mut out = vec![0u8; 42];
        hk.expand(&unhex(info), &mut out)
            .expect("42 bytes is a valid length");
        assert_eq!(out, unhex(okm));
    }
}

/// RFC 8452, Appendix C.2 (AEAD_AES_256_GCM_SIV), the first vectors.
#[test]
fn aes256_gcm_siv_rfc8452() {
    let key = unhex("0100000000000000000000000000000000000000000000000000000000000000");
    let nonce: [u8; 12] = unhex("030000000000000000000000")
        .try_into()
        .expect("12 bytes");
    let cases = [
        ("", "07f5f4169bbf55a8400cd47ea6fd400f"),
        (
            "0100000000000000",
            "c2ef328e5c71c83b843122130f7364b761e0b97427e3df28",
        ),
        (
            "010000000000000000000000",
            "9aab2aeb3faa0a34aea8e2b18ca50da9ae6559e48fd10f6e5c9ca17e",
        ),
    ];
    let cipher = Aes256GcmSiv::new_from_slice(&key).expect("32-byte key");
    for (plain, expected) in cases {
        let mut buf = unhex(plain);
        let tag = cipher
            .encrypt_inout_detached(&nonce.into(), b"", buf.as_mut_slice().into())
            .expect("short input");
        buf.extend_from_slice(&tag);
        assert_eq!(buf, unhex(expected));
    }
}
