//! The simulated model catalogue: what LM Studio would have downloaded.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SimModelKind {
    Llm,
    Embedding,
}

/// The file format, which decides the engine: llama.cpp for GGUF (4 parallel slots), MLX on
/// Apple silicon (1 slot, and a crash on a second concurrent prediction).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SimFormat {
    #[default]
    Gguf,
    Mlx,
}

/// One downloadable model. A catalogue file (`lmstudio-sim --catalogue FILE`) is a JSON array of
/// these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimModel {
    pub key: String,
    #[serde(rename = "type")]
    pub kind: SimModelKind,
    pub publisher: String,
    pub display_name: String,
    #[serde(default)]
    pub architecture: Option<String>,
    pub size_bytes: u64,
    #[serde(default)]
    pub params_string: Option<String>,
    pub max_context_length: u32,
    #[serde(default)]
    pub vision: bool,
    /// Reasoning models think before they answer; their thoughts use output tokens first.
    #[serde(default)]
    pub reasoning: bool,
    #[serde(default)]
    pub tool_use: bool,
    #[serde(default = "default_quantization")]
    pub quantization: String,
    #[serde(default)]
    pub format: SimFormat,
}

fn default_quantization() -> String {
    "Q4_K_M".into()
}

const GB: u64 = 1_000_000_000;

#[allow(clippy::too_many_arguments)] // a table row, read positionally below
fn llm(
    key: &str,
    publisher: &str,
    display_name: &str,
    architecture: &str,
    size_bytes: u64,
    params: &str,
    max_context_length: u32,
    (vision, reasoning): (bool, bool),
) -> SimModel {
    SimModel {
        key: key.into(),
        kind: SimModelKind::Llm,
        publisher: publisher.into(),
        display_name: display_name.into(),
        architecture: Some(architecture.into()),
        size_bytes,
        params_string: Some(params.into()),
        max_context_length,
        vision,
        reasoning,
        tool_use: true,
        quantization: default_quantization(),
        format: SimFormat::Gguf,
    }
}

/// Six models: LLMs from 1 to 12 GB, two with vision, two that reason, one not trained for
/// tools, one embedding model.
pub fn default_catalogue() -> Vec<SimModel> {
    vec![
        llm(
            "ibm/granite-4-micro",
            "ibm",
            "Granite 4 Micro",
            "granite",
            2_100_000_000,
            "3B",
            131_072,
            (false, false),
        ),
        llm(
            "qwen/qwen3-4b",
            "qwen",
            "Qwen3 4B",
            "qwen3",
            2_500_000_000,
            "4B",
            32_768,
            (false, true),
        ),
        llm(
            "qwen/qwen3-vl-4b",
            "qwen",
            "Qwen3 VL 4B",
            "qwen3vl",
            3_300_000_000,
            "4B",
            262_144,
            (true, false),
        ),
        // Not trained for tool use, as LM Studio marks Gemma 3.
        SimModel {
            tool_use: false,
            ..llm(
                "google/gemma-3-12b",
                "google",
                "Gemma 3 12B",
                "gemma3",
                8 * GB + 100_000_000,
                "12B",
                131_072,
                (true, false),
            )
        },
        llm(
            "openai/gpt-oss-20b",
            "openai",
            "gpt-oss 20B",
            "gpt-oss",
            12 * GB + 100_000_000,
            "20B",
            131_072,
            (false, true),
        ),
        SimModel {
            key: "text-embedding-nomic-embed-text-v1.5".into(),
            kind: SimModelKind::Embedding,
            publisher: "nomic-ai".into(),
            display_name: "Nomic Embed Text v1.5".into(),
            architecture: None,
            size_bytes: 274_290_560,
            params_string: None,
            max_context_length: 2048,
            vision: false,
            reasoning: false,
            tool_use: false,
            quantization: "F16".into(),
            format: SimFormat::Gguf,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_defaults_to_gguf_in_catalogue_files() {
        let json = r#"[{"key":"a/b","type":"llm","publisher":"a","display_name":"B","size_bytes":1,"max_context_length":4096},
            {"key":"a/c","type":"llm","publisher":"a","display_name":"C","size_bytes":1,"max_context_length":4096,"format":"mlx"}]"#;
        let models: Vec<SimModel> = serde_json::from_str(json).unwrap_or_default();
        let formats: Vec<SimFormat> = models.iter().map(|m| m.format).collect();
        assert_eq!(formats, [SimFormat::Gguf, SimFormat::Mlx]);
    }
}
