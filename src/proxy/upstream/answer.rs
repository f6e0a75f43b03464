//! An endpoint's answer body, whichever protocol brought it.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::body::BoxError;
use super::body::H2Body;

/// An endpoint's answer body, as hyper's HTTP/1.1 client or our HTTP/2 one read it.
#[derive(Debug)]
pub enum EndpointBody {
    /// From an HTTP/1.1 connection.
    H1(Incoming),
    /// From an HTTP/2 stream.
    H2(H2Body),
}

impl Body for EndpointBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::H1(b) => Pin::new(b).poll_frame(cx).map_err(|e| Box::new(e) as BoxError),
            Self::H2(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::H1(b) => b.is_end_stream(),
            Self::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::H1(b) => b.size_hint(),
            Self::H2(b) => b.size_hint(),
        }
    }
}
