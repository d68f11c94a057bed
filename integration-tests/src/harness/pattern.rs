//! Deterministic byte streams: both ends regenerate the same bytes, so a
//! transfer is checked byte for byte (and by CRC-32) without storing it.

use bytes::Bytes;

/// A xorshift64* generator of bytes.
#[derive(Debug, Clone)]
pub struct Pattern {
    state: u64,
}

impl Pattern {
    /// A stream for `seed`.
    pub fn new(seed: u64) -> Self {
        Pattern {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }

    /// The next `n` bytes (`n` a multiple of 8 except possibly the last chunk).
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            let v = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    /// The next chunk of `n` bytes.
    pub fn chunk(&mut self, n: usize) -> Bytes {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        Bytes::from(v)
    }
}

/// Checks received bytes against the pattern as they arrive.
#[derive(Debug)]
pub struct Verifier {
    pattern: Pattern,
    pending: Vec<u8>,
    /// Bytes checked.
    pub len: u64,
    crc: crc32fast::Hasher,
}

impl Verifier {
    /// A verifier for `seed`.
    pub fn new(seed: u64) -> Self {
        Verifier {
            pattern: Pattern::new(seed),
            pending: Vec::new(),
            len: 0,
            crc: crc32fast::Hasher::new(),
        }
    }

    /// Feeds bytes; false at the first mismatch. Chunks are compared in
    /// 8-byte aligned units so arbitrary chunking works.
    pub fn feed(&mut self, data: &[u8]) -> bool {
        self.crc.update(data);
        self.pending.extend_from_slice(data);
        let whole = self.pending.len() / 8 * 8;
        let mut expected = vec![0u8; whole];
        self.pattern.fill(&mut expected);
        let ok = self.pending[..whole] == expected[..];
        self.pending.drain(..whole);
        self.len += data.len() as u64;
        ok
    }

    /// Checks the tail (length not a multiple of 8) and returns the CRC-32.
    pub fn finish(mut self) -> (bool, u32) {
        let mut expected = vec![0u8; self.pending.len()];
        self.pattern.fill(&mut expected);
        (self.pending == expected, self.crc.finalize())
    }
}

/// CRC-32 of the first `n` bytes of the pattern for `seed`.
pub fn crc_of(seed: u64, n: u64) -> u32 {
    let mut p = Pattern::new(seed);
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut left = n;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        p.fill(&mut buf[..k]);
        h.update(&buf[..k]);
        left -= k as u64;
    }
    h.finalize()
}
