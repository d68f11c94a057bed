//! Bodies of the GitLab client: what a request carries (nothing, the common
//! case, at no allocation; or a stream) and helpers to read an answer.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Boxed body error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// GitLab's answer: the head, and a body not yet read.
pub type Response = http::Response<Incoming>;

/// A streamed request body (an upload, a push).
pub struct RequestBody(UnsyncBoxBody<Bytes, BoxError>);

impl RequestBody {
    /// Wraps any body of bytes.
    pub fn wrap<B>(body: B) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        RequestBody(body.map_err(Into::into).boxed_unsync())
    }
}

/// The body type the client sends.
pub(super) enum ClientBody {
    Empty,
    Stream(UnsyncBoxBody<Bytes, BoxError>),
}

impl From<Option<RequestBody>> for ClientBody {
    fn from(b: Option<RequestBody>) -> Self {
        match b {
            None => ClientBody::Empty,
            Some(RequestBody(b)) => ClientBody::Stream(b),
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ClientBody::Empty => Poll::Ready(None),
            ClientBody::Stream(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Empty => true,
            ClientBody::Stream(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Empty => SizeHint::with_exact(0),
            ClientBody::Stream(b) => b.size_hint(),
        }
    }
}

/// The answer's length when GitLab announced it.
pub fn content_length(resp: &Response) -> Option<u64> {
    resp.body().size_hint().exact()
}

/// The next chunk of data of `body` (`None` at its end); trailers are
/// skipped.
pub async fn next_chunk(body: &mut Incoming) -> Result<Option<Bytes>, hyper::Error> {
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            return Ok(Some(data));
        }
    }
    Ok(None)
}

/// The whole body (for small answers: probes, JSON).
pub async fn collect(body: Incoming) -> Result<Bytes, hyper::Error> {
    Ok(body.collect().await?.to_bytes())
}
