//! The codec of every gitproxy service: prost encoding with small initial
//! buffers.
//!
//! tonic's default gives every stream an 8 KiB encode buffer and an 8 KiB
//! decode buffer up front. A broker holds one long-lived stream per agent,
//! most of them idle, so those 16 KiB were 40 % of its memory per agent
//! (BENCHMARKS.md, scale scenario). Starting at 1 KiB costs nothing on the
//! busy path: a buffer grows to the largest message it carries (bounded by
//! the tunnel's frame size) and keeps that capacity for the stream's life.
//! The yield threshold stays tonic's (32 KiB), so batching is unchanged.

use std::marker::PhantomData;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial size of a stream's encode and decode buffers.
pub const INITIAL_BUFFER: usize = 1024;
/// Encoded bytes after which an encoder yields to let them be sent.
pub const YIELD_THRESHOLD: usize = 32 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(INITIAL_BUFFER, YIELD_THRESHOLD)
}

/// [`ProstCodec`] with [`INITIAL_BUFFER`]-sized buffers.
#[derive(Debug, Clone)]
pub struct SmallBufferCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        SmallBufferCodec { _pd: PhantomData }
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}
