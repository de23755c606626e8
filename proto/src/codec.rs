//! NDJSON framing: one JSON object per `\n`-terminated line, at most [`MAX_LINE`] bytes.

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
#[derive(Debug)]
pub struct LineReader<R> {
    inner: R,
    max_line: usize,
}

impl<R: AsyncBufRead + Unpin> LineReader<R> {
    pub fn new(inner: R) -> Self {
        Self::with_max_line(inner, MAX_LINE)
    }

    pub fn with_max_line(inner: R, max_line: usize) -> Self {
        LineReader { inner, max_line }
    }

    /// The reader underneath.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The next frame, or `None` at end of stream. A last line without `\n` still counts.
    pub async fn next_frame(&mut self) -> std::io::Result<Option<Frame>> {
        let mut line = Vec::new();
        let mut len = 0usize;
        let mut too_long = false;
        loop {
            let available = self.inner.fill_buf().await?;
            if available.is_empty() {
                return Ok(match (len, too_long) {
                    (0, _) => None,
                    (_, true) => Some(Frame::TooLong { len }),
                    (_, false) => Some(Frame::Line(line)),
                });
            }
            let newline = available.iter().position(|&b| b == b'\n');
            let chunk = &available[..newline.unwrap_or(available.len())];
            len += chunk.len();
            if !too_long {
                if line.len() + chunk.len() > self.max_line {
                    too_long = true;
                    line = Vec::new();
                } else {
                    line.extend_from_slice(chunk);
                }
            }
            let consumed = chunk.len() + usize::from(newline.is_some());
            self.inner.consume(consumed);
            if newline.is_some() {
                if too_long {
                    return Ok(Some(Frame::TooLong { len }));
                }
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(Some(Frame::Line(line)));
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
    async fn empty_lines_are_frames_and_eof_ends() {
        assert_eq!(frames(b"\n", 5).await, vec![Frame::Line(vec![])]);
        assert_eq!(frames(b"", 5).await, vec![]);
    }
}
