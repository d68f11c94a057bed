//! Flow-control settings negotiated in the Hello/Welcome handshake, and the
//! fixed limits of the tunnel.

/// Largest tunnel message either side accepts (a head with its headers, or a
/// Data frame of the largest chunk, with room to spare).
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// Protocol violations a peer may commit on one stream before the stream is
/// ended (see [`super::violations`]). High enough that a peer with a bug in
/// one code path keeps serving (each violation already ends its request),
/// low enough that a hostile one is cut off after a bounded amount of work.
pub const MAX_PROTOCOL_VIOLATIONS: u32 = 100;

/// Per-request flow-control numbers of one side of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowSettings {
    /// Bytes of body a receiver buffers per request before it must hand
    /// credit back; the per-request memory bound.
    pub window_bytes: u32,
    /// Smallest cost charged per Data frame, so a flood of tiny frames is
    /// bounded in count as well as in bytes.
    pub min_frame_cost: u32,
    /// Largest Data payload.
    pub max_chunk_bytes: u32,
}

impl Default for FlowSettings {
    fn default() -> Self {
        FlowSettings {
            window_bytes: 512 * 1024,
            min_frame_cost: 1024,
            max_chunk_bytes: 64 * 1024,
        }
    }
}

impl FlowSettings {
    /// The cost of a Data frame of `len` bytes.
    pub fn frame_cost(&self, len: usize) -> usize {
        len.max(self.min_frame_cost as usize)
    }

    /// Most frames a receiver can have buffered for one request, plus room
    /// for the closing frame.
    pub fn max_buffered_frames(&self) -> usize {
        (self.window_bytes / self.min_frame_cost.max(1)) as usize + 2
    }

    /// Credit is handed back once this much was consumed; at most a quarter
    /// of the window, which guarantees a blocked sender is always unblocked
    /// (it can be blocked only with more than `window - max_chunk` unreturned).
    pub fn return_threshold(&self) -> usize {
        (self.window_bytes / 4) as usize
    }

    /// Checks the numbers are consistent (a window holds at least four of
    /// the largest chunks; costs are positive).
    pub fn validate(&self) -> Result<(), String> {
        if self.min_frame_cost == 0 || self.max_chunk_bytes == 0 {
            return Err("min_frame_cost and max_chunk_bytes must be positive".into());
        }
        if self.min_frame_cost > self.max_chunk_bytes {
            return Err("min_frame_cost must not exceed max_chunk_bytes".into());
        }
        if self.window_bytes < self.max_chunk_bytes.saturating_mul(4) {
            return Err(format!(
                "window of {} bytes must hold at least 4 chunks of {} bytes",
                self.window_bytes, self.max_chunk_bytes
            ));
        }
        if self.window_bytes > 64 * 1024 * 1024 {
            return Err("window must not exceed 64 MiB".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let f = FlowSettings::default();
        f.validate().unwrap();
        assert_eq!(f.frame_cost(1), 1024);
        assert_eq!(f.frame_cost(65536), 65536);
        assert!(f.return_threshold() <= (f.window_bytes - f.max_chunk_bytes) as usize);
    }

    #[test]
    fn rejects_small_windows() {
        let f = FlowSettings {
            window_bytes: 1000,
            ..FlowSettings::default()
        };
        assert!(f.validate().is_err());
    }
}
