//! PADMÉ padding (Nikitin et al., "Reducing Metadata Leakage from Encrypted
//! Files and Communication with PURBs", PETS 2019).
//!
//! A length `L` is rounded up to a bucket whose size leaks at most
//! `O(log log L)` bits about `L`, with at most about 12% overhead.

/// The PADMÉ bucket for a plaintext of `len` bytes.
pub fn padme(len: usize) -> usize {
    if len < 2 {
        return len;
    }
    let e = usize::BITS - 1 - len.leading_zeros(); // floor(log2 len)
    let s = u32::BITS - e.leading_zeros(); // floor(log2 e) + 1
    let last_bits = e - s;
    let mask = (1usize << last_bits) - 1;
    (len + mask) & !mask
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_buckets() {
        // Values from the PURBs paper's reference implementation.
        assert_eq!(padme(0), 0);
        assert_eq!(padme(1), 1);
        assert_eq!(padme(9), 10);
        assert_eq!(padme(100), 104);
        assert_eq!(padme(1000), 1024);
        assert_eq!(padme(1025), 1088);
        assert_eq!(padme(1 << 20), 1 << 20);
    }

    proptest! {
        #[test]
        fn never_shrinks_and_overhead_is_bounded(len in 0usize..(1 << 24)) {
            let p = padme(len);
            prop_assert!(p >= len);
            prop_assert!(p - len <= len / 8 + 1, "len {len} padded to {p}");
            prop_assert_eq!(padme(p), p, "a bucket pads to itself");
        }
    }
}
