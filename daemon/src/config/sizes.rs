//! Sizes in config files: byte counts with units, and the memory budget (a size or a share of
//! physical memory).

use super::*;

/// A byte count written with a unit: `"512MiB"`, `"24GiB"`, `"8 GB"`, or `"0"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteCount(pub u64);

impl FromStr for ByteCount {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        text.trim()
            .parse::<bytesize::ByteSize>()
            .map(|size| ByteCount(size.as_u64()))
            .map_err(|_| format!("invalid size {text:?}: use a number with a unit, such as \"512MiB\" or \"24GiB\""))
    }
}

impl fmt::Display for ByteCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", bytesize::ByteSize(self.0).display().iec())
    }
}

/// The pool's memory budget, as configured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MemoryBudget {
    /// A share of physical memory.
    Percent(f64),
    Bytes(ByteCount),
}

impl FromStr for MemoryBudget {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().strip_suffix('%') {
            Some(number) => match number.trim().parse::<f64>() {
                Ok(p) if p > 0.0 && p <= 100.0 => Ok(MemoryBudget::Percent(p)),
                _ => Err(format!(
                    "invalid memory budget {text:?}: a percentage must be in (0, 100]"
                )),
            },
            None => text.parse().map(MemoryBudget::Bytes),
        }
    }
}

impl fmt::Display for MemoryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryBudget::Percent(p) => write!(f, "{p}%"),
            MemoryBudget::Bytes(bytes) => bytes.fmt(f),
        }
    }
}

impl MemoryBudget {
    /// The budget in bytes, given the machine's physical memory.
    pub fn resolve(self, physical: Option<u64>) -> Result<u64, ConfigError> {
        match self {
            MemoryBudget::Bytes(ByteCount(bytes)) => Ok(bytes),
            MemoryBudget::Percent(p) => physical
                .map(|total| (total as f64 * p / 100.0) as u64)
                .ok_or_else(|| {
                    ConfigError::Invalid(
                        "[pool] memory_budget: cannot read this machine's memory size; give a size such as \"24GiB\"".into(),
                    )
                }),
        }
    }
}

/// Physical memory of this machine, if the OS tells.
pub fn physical_memory() -> Option<u64> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let info = rustix::system::sysinfo();
        Some(info.totalram * u64::from(info.mem_unit))
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let out = std::process::Command::new("sysctl")
            .args(["-n", "hw.memsize"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }
}

/// Serde through `FromStr` and `Display`, for the string-valued config types.
macro_rules! serde_via_str {
    ($($ty:ty),*) => {$(
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                String::deserialize(deserializer)?.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}
serde_via_str!(ByteCount, MemoryBudget);
