//! NDJSON framing: one JSON object per `\n`-terminated line, at most [`MAX_LINE`] bytes.

use std::time::Instant;

use serde::Serialize;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

/// Longest request or reply line accepted, without its newline. Long enough for large documents
/// piped in by agents, short enough that one client cannot make the daemon buffer without bound.
pub const MAX_LINE: usize = 4 * 1024 * 1024;

/// One frame read from a stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete line, without its `\n` (and without a `\r` before it).
    Line(Vec<u8>),
    /// A line longer than the limit; its bytes were read and dropped, so the stream stays usable.
    TooLong { len: usize },
}

/// Reads lines with a length bound, keeping memory at the bound however long a line is.
///
/// Cancel-safe: a line read in part is kept in the reader, so dropping a `next_frame` future
/// (in a `select!`) loses nothing.
#[derive(Debug)]
pub struct LineReader<R> {
    inner: R,
    max_line: usize,
    line: Vec<u8>,
    len: usize,
    too_long: bool,
    /// When the first byte of the line in progress arrived.
    started: Option<Instant>,
}

impl<R: AsyncBufRead + Unpin> LineReader<R> {
    pub fn new(inner: R) -> Self {
        Self::with_max_line(inner, MAX_LINE)
    }

    pub fn with_max_line(inner: R, max_line: usize) -> Self {
        LineReader {
            inner,
            max_line,
            line: Vec::new(),
            len: 0,
            too_long: false,
            started: None,
        }
    }

    /// The reader underneath.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// When the line in progress began, if one is in progress.
    pub fn partial_since(&self) -> Option<Instant> {
        self.started
    }

    fn take_frame(&mut self) -> Frame {
        let frame = if self.too_long {
            Frame::TooLong { len: self.len }
        } else {
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            Frame::Line(line)
        };
        self.line = Vec::new();
        self.len = 0;
        self.too_long = false;
        self.started = None;
        frame
    }

    /// The next frame, or `None` at end of stream. A last line without `\n` still counts.
    pub async fn next_frame(&mut self) -> std::io::Result<Option<Frame>> {
        loop {
            let available = self.inner.fill_buf().await?;
            if available.is_empty() {
                return Ok((self.len > 0).then(|| self.take_frame()));
            }
            let newline = available.iter().position(|&b| b == b'\n');
            let chunk = &available[..newline.unwrap_or(available.len())];
            self.started.get_or_insert_with(Instant::now);
            self.len += chunk.len();
            if !self.too_long {
                if self.line.len() + chunk.len() > self.max_line {
                    self.too_long = true;
                    self.line = Vec::new();
                } else {
                    self.line.extend_from_slice(chunk);
                }
            }
            let consumed = chunk.len() + usize::from(newline.is_some());
            self.inner.consume(consumed);
            if newline.is_some() {
                return Ok(Some(self.take_frame()));
            }
        }
    }
}

/// Serializes `value` as one line, newline included.
pub fn encode_line<T: Serialize>(value: &T) -> Vec<u8> {
    // Our wire types are plain data with string keys: serializing them cannot fail.
    let mut line = serde_json::to_vec(value).unwrap_or_else(|e| {
        format!(r#"{{"id":null,"type":"error","error":{{"code":"internal","message":"reply could not be encoded: {e}"}}}}"#)
            .into_bytes()
    });
    line.push(b'\n');
    line
}

/// Writes `value` as one line and flushes.
pub async fn write_line<W: AsyncWrite + Unpin, T: Serialize>(
    writer: &mut W,
    value: &T,
) -> std::io::Result<()> {
    writer.write_all(&encode_line(value)).await?;
    writer.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn frames(input: &[u8], max: usize) -> Vec<Frame> {
        // A tiny buffer makes lines span many fill_buf calls.
        let reader = tokio::io::BufReader::with_capacity(3, input);
        let mut lines = LineReader::with_max_line(reader, max);
        let mut out = Vec::new();
        while let Some(frame) = lines.next_frame().await.unwrap() {
            out.push(frame);
        }
        out
    }

    #[tokio::test]
    async fn splits_lines_and_strips_crlf() {
        let got = frames(b"{\"a\":1}\r\n{}\nlast", 100).await;
        assert_eq!(
            got,
            vec![
                Frame::Line(b"{\"a\":1}".to_vec()),
                Frame::Line(b"{}".to_vec()),
                Frame::Line(b"last".to_vec())
            ]
        );
    }

    #[tokio::test]
    async fn an_overlong_line_is_reported_and_the_next_one_still_read() {
        let got = frames(b"0123456789\nok\n", 5).await;
        assert_eq!(
            got,
            vec![Frame::TooLong { len: 10 }, Frame::Line(b"ok".to_vec())]
        );
        // Exactly at the limit is fine.
        assert_eq!(
            frames(b"01234\n", 5).await,
            vec![Frame::Line(b"01234".to_vec())]
        );
    }

    #[tokio::test]
    async fn a_cancelled_read_loses_nothing() {
        // The line arrives in two parts; the first read is cancelled after the first part.
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut lines = LineReader::new(tokio::io::BufReader::new(rx));
        tx.write_all(b"{\"half\":").await.unwrap();
        let first =
            tokio::time::timeout(std::time::Duration::from_millis(20), lines.next_frame()).await;
        assert!(first.is_err(), "no frame yet");
        assert!(lines.partial_since().is_some());
        tx.write_all(b"1}\n").await.unwrap();
        assert_eq!(
            lines.next_frame().await.unwrap(),
            Some(Frame::Line(b"{\"half\":1}".to_vec()))
        );
        assert!(lines.partial_since().is_none());
    }

    #[tokio::test]
    async fn empty_lines_are_frames_and_eof_ends() {
        assert_eq!(frames(b"\n", 5).await, vec![Frame::Line(vec![])]);
        assert_eq!(frames(b"", 5).await, vec![]);
    }
}
