//! The files a `local_task` names, read by `lmsd-mcp` itself so that their contents never pass
//! through the agent's context: paths or globs, confined to the allowed roots (symlinks out of
//! them refused), text only, bounded per file and in total.

use std::path::{Path, PathBuf};

/// Where files may be read from, and how much.
#[derive(Debug, Clone)]
pub struct Access {
    /// Canonical directories; a file must resolve inside one.
    pub roots: Vec<PathBuf>,
    /// Bytes per file, and in total per task.
    pub max_bytes: u64,
}

/// A file read for a task.
#[derive(Debug)]
pub struct Read {
    pub path: String,
    pub content: Content,
}

#[derive(Debug, PartialEq)]
pub enum Content {
    Text(String),
    /// An image, as a data URL, for a vision model.
    Image(String),
}

/// The data-URL type of an image file, by its name.
fn image_kind(path: &Path) -> Option<&'static str> {
    match path.extension()?.to_str()?.to_lowercase().as_str() {
        "png" => Some("png"),
        "jpg" | "jpeg" => Some("jpeg"),
        "webp" => Some("webp"),
        "gif" => Some("gif"),
        _ => None,
    }
}

impl Access {
    /// Every file the patterns name, in order (a glob's matches sorted), each once; with
    /// `images`, image files as images.
    pub fn read_all(&self, patterns: &[String], images: bool) -> Result<Vec<Read>, String> {
        let mut paths: Vec<PathBuf> = Vec::new();
        for pattern in patterns {
            let matched = self.expand(pattern)?;
            for path in matched {
                if !paths.contains(&path) {
                    paths.push(path);
                }
            }
        }
        let mut total = 0u64;
        let mut read = Vec::with_capacity(paths.len());
        for path in paths {
            let bytes = self.read_one(&path)?;
            total += bytes.len() as u64;
            if total > self.max_bytes {
                return Err(format!(
                    "the files come to more than {} bytes together (at {}); name fewer, or start lmsd-mcp with a larger --max-file-bytes",
                    self.max_bytes,
                    path.display()
                ));
            }
            let content = match image_kind(&path).filter(|_| images) {
                Some(kind) => {
                    use base64::Engine;
                    let data = base64::engine::general_purpose::STANDARD.encode(&bytes);
                    Content::Image(format!("data:image/{kind};base64,{data}"))
                }
                None => Content::Text(String::from_utf8(bytes).map_err(|_| {
                    format!(
                        "{} is not a text file (not UTF-8); only text files are sent (images with vision)",
                        path.display()
                    )
                })?),
            };
            read.push(Read {
                path: path.display().to_string(),
                content,
            });
        }
        Ok(read)
    }

    fn expand(&self, pattern: &str) -> Result<Vec<PathBuf>, String> {
        let absolute = |p: &Path| -> PathBuf {
            if p.is_absolute() {
                p.to_owned()
            } else {
                self.roots
                    .first()
                    .map_or_else(|| p.to_owned(), |root| root.join(p))
            }
        };
        if !pattern.contains(['*', '?', '[']) {
            return Ok(vec![absolute(Path::new(pattern))]);
        }
        let full = absolute(Path::new(pattern));
        let mut found: Vec<PathBuf> = glob::glob(&full.to_string_lossy())
            .map_err(|e| format!("{pattern:?} is not a valid glob: {e}"))?
            .filter_map(Result::ok)
            .filter(|p| p.is_file())
            .collect();
        found.sort();
        if found.is_empty() {
            return Err(format!("no file matches {pattern:?}"));
        }
        Ok(found)
    }

    fn read_one(&self, path: &Path) -> Result<Vec<u8>, String> {
        let shown = path.display();
        let real = path
            .canonicalize()
            .map_err(|e| format!("cannot read {shown}: {e}"))?;
        if !self.roots.iter().any(|root| real.starts_with(root)) {
            return Err(format!(
                "{shown} is outside the directories lmsd-mcp may read ({}); start it with --allow-dir to add one",
                self.roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let size = real
            .metadata()
            .map_err(|e| format!("cannot read {shown}: {e}"))?
            .len();
        if size > self.max_bytes {
            return Err(format!(
                "{shown} is {size} bytes, over the {} lmsd-mcp reads per file (--max-file-bytes)",
                self.max_bytes
            ));
        }
        std::fs::read(&real).map_err(|e| format!("cannot read {shown}: {e}"))
    }
}

/// The path of a `file://` URI (an MCP root), percent-escapes decoded; `None` for others.
pub fn path_of_file_uri(uri: &str) -> Option<PathBuf> {
    let rest = uri.strip_prefix("file://")?;
    // `file://host/path`: only the local host (empty or `localhost`) is a path here.
    let path = rest.strip_prefix("localhost").unwrap_or(rest);
    if !path.starts_with('/') {
        return None;
    }
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(high), Some(low)) => {
                decoded.push((high * 16 + low) as u8);
                i += 3;
            }
            (byte, _, _) => {
                decoded.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(decoded).ok().map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(dir: &Path, max_bytes: u64) -> Access {
        Access {
            roots: vec![dir.canonicalize().unwrap()],
            max_bytes,
        }
    }

    #[test]
    fn file_uris_become_paths() {
        assert_eq!(
            path_of_file_uri("file:///home/ada/my%20project"),
            Some(PathBuf::from("/home/ada/my project"))
        );
        assert_eq!(
            path_of_file_uri("file://localhost/tmp"),
            Some(PathBuf::from("/tmp"))
        );
        assert_eq!(path_of_file_uri("file://server/share"), None);
        assert_eq!(path_of_file_uri("https://example.com/x"), None);
    }

    #[test]
    fn files_are_read_inside_the_roots_only_and_within_bounds() {
        let inside = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(inside.path().join("a.txt"), "alpha").unwrap();
        std::fs::write(inside.path().join("b.txt"), "beta").unwrap();
        std::fs::write(inside.path().join("bin"), [0xff, 0xfe]).unwrap();
        std::fs::write(outside.path().join("secret.txt"), "no").unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("secret.txt"),
            inside.path().join("link.txt"),
        )
        .unwrap();
        let access = access(inside.path(), 16);

        let read = access.read_all(&["*.txt".into()], false).unwrap_err();
        assert!(
            read.contains("outside"),
            "the glob takes the symlink too: {read}"
        );
        let read = access
            .read_all(&["a.txt".into(), "b*.txt".into()], false)
            .unwrap();
        let texts: Vec<&Content> = read.iter().map(|r| &r.content).collect();
        assert_eq!(
            texts,
            [
                &Content::Text("alpha".into()),
                &Content::Text("beta".into())
            ]
        );
        std::fs::write(inside.path().join("dot.png"), [0x89, b'P']).unwrap();
        let image = access.read_all(&["dot.png".into()], true).unwrap();
        assert_eq!(
            image[0].content,
            Content::Image("data:image/png;base64,iVA=".into())
        );
        assert!(
            access.read_all(&["dot.png".into()], false).is_err(),
            "no vision, no image"
        );

        let escape = outside.path().join("secret.txt");
        let refused = access
            .read_all(&[escape.display().to_string()], false)
            .unwrap_err();
        assert!(refused.contains("outside the directories"), "{refused}");
        assert!(access
            .read_all(&["bin".into()], false)
            .unwrap_err()
            .contains("not a text file"));
        std::fs::write(inside.path().join("big.md"), "x".repeat(17)).unwrap();
        assert!(access
            .read_all(&["big.md".into()], false)
            .unwrap_err()
            .contains("over the 16"));
        std::fs::write(inside.path().join("c.md"), "12345678").unwrap();
        let together = access
            .read_all(&["a.txt".into(), "b.txt".into(), "c.md".into()], false)
            .unwrap_err();
        assert!(together.contains("together"), "{together}");
        assert!(access
            .read_all(&["none*.md".into()], false)
            .unwrap_err()
            .contains("no file matches"));
    }
}
