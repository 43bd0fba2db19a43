//! Writing an upload to disk at the disk's speed, durably, hashing it on the way.
//!
//! The receiving task gathers the body's chunks (without copying them) into batches of
//! about 1 MiB and hands each to two threads at once: a hasher (SHA-256 of a gigabyte is about 0.6 s of a core here) and a
//! writer, which appends them; every [`FLUSH_EVERY`] bytes a flusher thread (on a clone
//! of the descriptor) runs `fdatasync`, so dirty pages go to disk while the rest of the upload
//! is still arriving, rather than in one long flush at the end (which, for a bundle of
//! gigabytes, was a pause of seconds after the last byte). The final `fsync` then has
//! little left to do, and the upload is on disk before the client is answered.

use std::{
    fs::File,
    io::{self, Write as _},
    path::Path,
    sync::mpsc::{SyncSender, TrySendError, sync_channel},
};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

/// Bytes handed to the writer and hasher at a time.
const BATCH: usize = 1 << 20;
/// Buffers in flight between the receiving task and the writer.
const IN_FLIGHT: usize = 16;
/// Bytes written between two background flushes.
const FLUSH_EVERY: u64 = 16 << 20;

/// Chunks of the body, shared by the writer and the hasher.
type Batch = std::sync::Arc<Vec<Bytes>>;

/// A file being written by a writer thread and hashed by another.
pub(crate) struct DiskWriter {
    tx: Option<mpsc::Sender<Batch>>,
    hash_tx: Option<mpsc::Sender<Batch>>,
    batch: Vec<Bytes>,
    batched: usize,
    writer: tokio::task::JoinHandle<io::Result<()>>,
    hasher: tokio::task::JoinHandle<Sha256>,
}

impl DiskWriter {
    /// Creates `path` and starts its writer and hasher.
    pub(crate) async fn create(path: &Path) -> io::Result<Self> {
        let file = tokio::fs::File::create(path).await?.into_std().await;
        Ok(Self::start(file, Sha256::new()))
    }

    /// Opens `path` to append to what it holds (read once, to hash it); the writer and
    /// the bytes already there.
    pub(crate) async fn append(path: &Path) -> io::Result<(Self, u64)> {
        let path = path.to_path_buf();
        let (file, h, len) = tokio::task::spawn_blocking(move || -> io::Result<_> {
            let mut h = Sha256::new();
            let mut f = File::open(&path)?;
            let len = io::copy(&mut f, &mut h)?;
            let file = std::fs::OpenOptions::new().append(true).open(&path)?;
            Ok((file, h, len))
        })
        .await
        .map_err(io::Error::other)??;
        Ok((Self::start(file, h), len))
    }

    fn start(file: File, h: Sha256) -> Self {
        let (tx, rx) = mpsc::channel(IN_FLIGHT);
        let writer = tokio::task::spawn_blocking(move || write_all(file, rx));
        let (hash_tx, mut hash_rx) = mpsc::channel::<Batch>(IN_FLIGHT);
        let hasher = tokio::task::spawn_blocking(move || {
            let mut h = h;
            while let Some(batch) = hash_rx.blocking_recv() {
                for b in batch.iter() {
                    h.update(b);
                }
            }
            h
        });
        DiskWriter {
            tx: Some(tx),
            hash_tx: Some(hash_tx),
            batch: Vec::new(),
            batched: 0,
            writer,
            hasher,
        }
    }

    /// Appends `chunk`.
    pub(crate) async fn write(&mut self, chunk: Bytes) -> io::Result<()> {
        self.batched += chunk.len();
        self.batch.push(chunk);
        if self.batched >= BATCH {
            self.send().await?;
        }
        Ok(())
    }

    /// Hands the batch to the hasher and the writer.
    async fn send(&mut self) -> io::Result<()> {
        let batch: Batch = std::sync::Arc::new(std::mem::take(&mut self.batch));
        self.batched = 0;
        if let Some(h) = &self.hash_tx
            && h.send(batch.clone()).await.is_err()
        {
            return Err(io::Error::other("the hasher stopped"));
        }
        let sent = match &self.tx {
            Some(tx) => tx.send(batch).await.is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        // The writer stopped: its error says why.
        self.tx = None;
        match (&mut self.writer).await {
            Ok(Err(e)) => Err(e),
            _ => Err(io::Error::other("the disk writer stopped")),
        }
    }

    /// Gives up on the file: waits for the writer and hasher to stop, so that its
    /// space is freed as soon as it is removed.
    pub(crate) async fn abort(mut self) {
        self.tx = None;
        self.hash_tx = None;
        let _ = (&mut self.writer).await;
        let _ = (&mut self.hasher).await;
    }

    /// Writes what is buffered, waits for every byte to be on disk (`fsync`); the
    /// SHA-256 of every byte written.
    pub(crate) async fn finish(mut self) -> io::Result<Sha256> {
        if !self.batch.is_empty() {
            self.send().await?;
        }
        self.tx = None;
        self.hash_tx = None;
        (&mut self.writer)
            .await
            .map_err(|e| io::Error::other(format!("the disk writer failed: {e}")))??;
        (&mut self.hasher)
            .await
            .map_err(|e| io::Error::other(format!("the hasher failed: {e}")))
    }
}

/// The writer thread: appends what arrives, asks for a flush every [`FLUSH_EVERY`]
/// bytes, and syncs the whole file once the sender is gone.
fn write_all(mut file: File, mut rx: mpsc::Receiver<Batch>) -> io::Result<()> {
    let (flush, flusher) = start_flusher(file.try_clone()?);
    let mut written = 0u64;
    let mut asked = 0u64;
    let result = (|| -> io::Result<()> {
        while let Some(batch) = rx.blocking_recv() {
            for bytes in batch.iter() {
                file.write_all(bytes)?;
                written += bytes.len() as u64;
            }
            if written - asked >= FLUSH_EVERY {
                match flush.try_send(()) {
                    // Busy with the last one: ask again after the next buffer.
                    Ok(()) | Err(TrySendError::Full(())) => asked = written,
                    Err(TrySendError::Disconnected(())) => {}
                }
            }
        }
        Ok(())
    })();
    drop(flush);
    let flushed = flusher
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the flusher panicked")));
    result?;
    flushed?;
    file.sync_all()
}

/// A thread that runs `fdatasync` on `file` each time it is asked; its first error ends
/// it (and is returned when it is joined).
fn start_flusher(file: File) -> (SyncSender<()>, std::thread::JoinHandle<io::Result<()>>) {
    let (tx, rx) = sync_channel::<()>(1);
    let handle = std::thread::Builder::new()
        .name("ingest-flush".into())
        .spawn(move || {
            while rx.recv().is_ok() {
                file.sync_data()?;
            }
            Ok(())
        })
        .expect("a thread starts");
    (tx, handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_every_byte_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut w = DiskWriter::create(&path).await.unwrap();
        let mut want = Vec::new();
        for i in 0..3000u32 {
            let chunk: Vec<u8> = (0..(i % 997) as usize + 1)
                .map(|j| (i as usize + j) as u8)
                .collect();
            want.extend_from_slice(&chunk);
            w.write(Bytes::from(chunk)).await.unwrap();
        }
        let hash = w.finish().await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), want);
        assert_eq!(hash.finalize(), Sha256::digest(&want));
    }
}
