//! The control channel between the supervisor and a worker: a Unix stream socket pair,
//! inherited by the worker, carrying length-prefixed frames.
//!
//! A frame is a 4-byte big-endian length `n`, then `n` bytes: one tag byte and the payload.
//! The worker treats end-of-file as "the supervisor is gone" and drains, so a worker never
//! outlives its supervisor.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest accepted frame; a metrics snapshot is a few kilobytes.
const MAX_FRAME: usize = 16 * 1024 * 1024;

/// Supervisor to worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ToWorker {
    /// Stop accepting and drain. `gentle`: the rolling-restart flavour (see `conn`).
    Drain { gentle: bool },
    /// Send a metrics snapshot now (someone is scraping `/metrics`).
    Scrape,
}

/// Worker to supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ToSupervisor {
    /// The worker accepts connections on its inherited listener.
    Ready,
    /// A metrics snapshot in OpenMetrics text.
    Metrics(String),
}

const TAG_DRAIN_GENTLE: u8 = 1;
const TAG_DRAIN_IMMEDIATE: u8 = 2;
const TAG_SCRAPE: u8 = 3;
const TAG_READY: u8 = 10;
const TAG_METRICS: u8 = 11;

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, tag: u8, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len() + 1)
        .ok()
        .filter(|n| *n as usize <= MAX_FRAME)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "control frame too large"))?;
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.push(tag);
    frame.extend_from_slice(payload);
    w.write_all(&frame).await?;
    w.flush().await
}

/// Reads one frame; `Ok(None)` on a clean end-of-file between frames.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad control frame length {len}"),
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    let tag = buf.remove(0);
    Ok(Some((tag, buf)))
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl ToWorker {
    pub(crate) async fn write<W: AsyncWrite + Unpin>(&self, w: &mut W) -> io::Result<()> {
        let tag = match self {
            ToWorker::Drain { gentle: true } => TAG_DRAIN_GENTLE,
            ToWorker::Drain { gentle: false } => TAG_DRAIN_IMMEDIATE,
            ToWorker::Scrape => TAG_SCRAPE,
        };
        write_frame(w, tag, &[]).await
    }

    pub(crate) async fn read<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Self>> {
        Ok(match read_frame(r).await? {
            None => None,
            Some((TAG_DRAIN_GENTLE, _)) => Some(ToWorker::Drain { gentle: true }),
            Some((TAG_DRAIN_IMMEDIATE, _)) => Some(ToWorker::Drain { gentle: false }),
            Some((TAG_SCRAPE, _)) => Some(ToWorker::Scrape),
            Some((tag, _)) => return Err(invalid(format!("unknown control tag {tag}"))),
        })
    }
}

impl ToSupervisor {
    pub(crate) async fn write<W: AsyncWrite + Unpin>(&self, w: &mut W) -> io::Result<()> {
        match self {
            ToSupervisor::Ready => write_frame(w, TAG_READY, &[]).await,
            ToSupervisor::Metrics(text) => write_frame(w, TAG_METRICS, text.as_bytes()).await,
        }
    }

    pub(crate) async fn read<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Self>> {
        Ok(match read_frame(r).await? {
            None => None,
            Some((TAG_READY, _)) => Some(ToSupervisor::Ready),
            Some((TAG_METRICS, payload)) => Some(ToSupervisor::Metrics(
                String::from_utf8(payload).map_err(|e| invalid(e.to_string()))?,
            )),
            Some((tag, _)) => return Err(invalid(format!("unknown control tag {tag}"))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_eof_is_clean() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            ToSupervisor::Ready.write(&mut a).await.unwrap();
            let big = "x".repeat(10_000);
            ToSupervisor::Metrics(big).write(&mut a).await.unwrap();
            ToWorker::Drain { gentle: true }
                .write(&mut a)
                .await
                .unwrap();
            ToWorker::Scrape.write(&mut a).await.unwrap();
        });
        assert_eq!(
            ToSupervisor::read(&mut b).await.unwrap(),
            Some(ToSupervisor::Ready)
        );
        match ToSupervisor::read(&mut b).await.unwrap() {
            Some(ToSupervisor::Metrics(t)) => assert_eq!(t.len(), 10_000),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            ToWorker::read(&mut b).await.unwrap(),
            Some(ToWorker::Drain { gentle: true })
        );
        assert_eq!(
            ToWorker::read(&mut b).await.unwrap(),
            Some(ToWorker::Scrape)
        );
        writer.await.unwrap();
        assert_eq!(ToWorker::read(&mut b).await.unwrap(), None);
    }

    #[tokio::test]
    async fn garbage_is_an_error_not_a_panic() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 0, 0, 0]).await.unwrap();
        assert!(ToWorker::read(&mut b).await.is_err());
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0xff, 0xff, 0xff, 0xff]).await.unwrap();
        assert!(ToSupervisor::read(&mut b).await.is_err());
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 0, 0, 1, 99]).await.unwrap();
        assert!(ToSupervisor::read(&mut b).await.is_err());
        // truncated in the middle of a frame
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 0, 0, 9, TAG_METRICS, b'a']).await.unwrap();
        drop(a);
        assert!(ToSupervisor::read(&mut b).await.is_err());
    }
}
