//! The batch tools: `local_batch` submits a JSONL file of tasks as an lmsd batch job (the
//! agent gets a job id back at once, and the file's contents never enter its context), and
//! `local_batch_status` says how a job is doing and where its results are.

use lmsd_proto::{
    BatchDefaults, BatchJob, BatchState, BatchStatusRequest, BatchSubmitRequest, Outcome, Request,
};
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock};
use rmcp::{tool, tool_router, ErrorData, Peer, RoleServer};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::files::{Access, Content};
use crate::tools::{failure, refused, LocalTools};

/// The largest job file sent: it travels in one request line to lmsd (4 MiB with its JSON
/// escaping; so does `lmsd-ctl batch submit`'s). Larger jobs go through the front door's Files
/// and Batch APIs (64 MiB).
const MAX_BATCH_FILE: u64 = 2 << 20;

#[derive(Debug, Deserialize, JsonSchema)]
pub struct BatchParams {
    /// A JSONL file (a path under the allowed directories): one task per line, lmsd's form
    /// {"id", "input", "system"?, "model"?, "schema"?, "choices"?} or OpenAI's batch form.
    pub file: String,
    /// The model of lines that name none: a key from local_models, or "auto" (the default).
    pub model: Option<String>,
    /// The system prompt of lines that give none.
    pub system: Option<String>,
    /// A JSON Schema every line's answer must keep (lines with their own contract keep theirs).
    pub schema: Option<Value>,
    /// Labels every line's answer must be one of.
    pub choices: Option<Vec<String>>,
    /// Run the valid lines and record invalid ones as failed, instead of refusing the job.
    pub skip_invalid: Option<bool>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct BatchStatusParams {
    /// The job id local_batch returned; without it, every job.
    pub job_id: Option<String>,
}

fn summary(job: &BatchJob) -> String {
    let state = job.state.name();
    let mut line = format!(
        "{} {state}: {}/{} done, {} failed",
        job.job_id, job.done, job.total, job.failed
    );
    if let Some(eta) = job.eta_s {
        line.push_str(&format!(", about {eta} s left"));
    }
    if job.state == BatchState::Completed {
        line.push_str(&format!(
            "; results: `lmsd-ctl batch results {} -o FILE`",
            job.job_id
        ));
    }
    line
}

fn structured(job: &BatchJob) -> Value {
    json!({"job_id": job.job_id, "state": job.state, "total": job.total, "done": job.done,
           "failed": job.failed, "eta_s": job.eta_s})
}

#[tool_router(router = batch_router, vis = "pub(crate)")]
impl LocalTools {
    /// Submit a file of many similar tasks (label 10,000 tickets, extract fields from every
    /// invoice) as a background job on local models; returns a job id at once. Check it with
    /// local_batch_status.
    #[tool(name = "local_batch")]
    async fn local_batch(
        &self,
        Parameters(params): Parameters<BatchParams>,
        peer: Peer<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let access = Access {
            max_bytes: MAX_BATCH_FILE,
            ..self.access_for(&peer).await
        };
        let lines = match access.read_all(std::slice::from_ref(&params.file), false) {
            Ok(read) => match read.into_iter().next().map(|r| r.content) {
                Some(Content::Text(text)) => text,
                _ => return Ok(refused(format!("{} is not a text file", params.file))),
            },
            Err(why) => return Ok(refused(why)),
        };
        let submit = BatchSubmitRequest {
            lines,
            defaults: BatchDefaults {
                model: params.model,
                system: params.system,
                schema: params.schema,
                choices: params.choices.unwrap_or_default(),
                max_output_tokens: None,
            },
            skip_invalid: params.skip_invalid.unwrap_or(false),
            name: Some(params.file),
        };
        let outcome = match self.connect().await {
            Ok(mut client) => client.call(Request::BatchSubmit(submit), |_| {}).await,
            Err(error) => Err(error),
        };
        match outcome {
            Ok(Outcome::Batch(job)) => {
                let mut result = CallToolResult::success(vec![ContentBlock::text(format!(
                    "submitted: {}",
                    summary(&job)
                ))]);
                result.structured_content = Some(structured(&job));
                Ok(result)
            }
            Ok(_) => Ok(refused("lmsd answered something else".into())),
            Err(error) => Ok(failure(&error)),
        }
    }

    /// How a batch job is doing: done, failed, time left (without a job id: every job).
    #[tool(name = "local_batch_status")]
    async fn local_batch_status(
        &self,
        Parameters(params): Parameters<BatchStatusParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let request = Request::BatchStatus(BatchStatusRequest {
            job_id: params.job_id,
        });
        let outcome = match self.connect().await {
            Ok(mut client) => client.call(request, |_| {}).await,
            Err(error) => Err(error),
        };
        let jobs = match outcome {
            Ok(Outcome::Batch(job)) => vec![job],
            Ok(Outcome::BatchList(list)) => list.jobs,
            Ok(_) => return Ok(refused("lmsd answered something else".into())),
            Err(error) => return Ok(failure(&error)),
        };
        let text = if jobs.is_empty() {
            "no batch jobs".to_owned()
        } else {
            jobs.iter().map(summary).collect::<Vec<_>>().join("\n")
        };
        let mut result = CallToolResult::success(vec![ContentBlock::text(text)]);
        result.structured_content =
            Some(json!({"jobs": jobs.iter().map(structured).collect::<Vec<_>>()}));
        Ok(result)
    }
}
