//! OpenAI's Files and Batch APIs over lmsd's batch jobs, so scripts written for them run
//! locally by changing `base_url`: upload a JSONL file (`purpose: batch`), create a batch
//! from it, poll it, download its output and error files in OpenAI's shapes, cancel it. The
//! uploads and the job live in lmsd's batch store, on this machine; an upload goes with the
//! job made from it.

use axum::body::Bytes;
use axum::extract::{Multipart, Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use lmsd_proto::{BatchJob, BatchState, BatchSubmitRequest, ErrorCode, WireError};
use serde_json::{json, Value};

use super::{authorize, parse_object, status_of, unix_now, Dialect, Front};
use crate::batch::{FileRow, LineRow};

const DIALECT: Dialect = Dialect::OpenAi;
/// The endpoints a batch may run.
const ENDPOINTS: [&str; 2] = ["/v1/chat/completions", "/v1/embeddings"];

fn not_found(what: &str, id: &str) -> Response {
    DIALECT.error(WireError::new(
        ErrorCode::ModelNotFound,
        format!("no {what} {id:?} on this lmsd"),
    ))
}

fn file_object(file: &FileRow) -> Value {
    json!({"id": file.id, "object": "file", "bytes": file.bytes, "created_at": file.created,
        "filename": file.filename, "purpose": file.purpose, "status": "processed"})
}

/// The ids of a job's output and error files, made from its lines when asked for.
fn output_id(job: &str) -> String {
    format!("file-out-{job}")
}
fn errors_id(job: &str) -> String {
    format!("file-err-{job}")
}

pub(super) async fn upload(
    State(front): State<Front>,
    headers: HeaderMap,
    mut form: Multipart,
) -> Response {
    if let Err(wire) = authorize(&front, &headers) {
        return DIALECT.error(wire);
    }
    let (mut purpose, mut file) = (None, None);
    loop {
        match form.next_field().await {
            Ok(Some(field)) => {
                let name = field.name().unwrap_or_default().to_owned();
                let filename = field.file_name().unwrap_or("upload.jsonl").to_owned();
                let bytes = match field.bytes().await {
                    Ok(bytes) => bytes,
                    Err(e) => {
                        return DIALECT
                            .error(WireError::bad_request(format!("the upload broke: {e}")))
                    }
                };
                match name.as_str() {
                    "purpose" => purpose = Some(String::from_utf8_lossy(&bytes).into_owned()),
                    "file" => file = Some((filename, bytes)),
                    _ => {}
                }
            }
            Ok(None) => break,
            Err(e) => {
                return DIALECT.error(WireError::bad_request(format!(
                    "not a multipart upload: {e}"
                )))
            }
        }
    }
    if purpose.as_deref() != Some("batch") {
        return DIALECT.error_about(
            WireError::bad_request("lmsd keeps files for batches only: send purpose \"batch\""),
            Some("purpose"),
        );
    }
    let Some((filename, bytes)) = file else {
        return DIALECT.error_about(
            WireError::bad_request("the upload has no \"file\""),
            Some("file"),
        );
    };
    let row = FileRow {
        id: format!("file-{:024x}", fastrand::u128(..1 << 96)),
        purpose: "batch".into(),
        filename,
        bytes: bytes.len() as u64,
        created: unix_now(),
    };
    match front.ctx.batches.put_file(&row, &bytes) {
        Ok(()) => Json(file_object(&row)).into_response(),
        Err(e) => DIALECT.error(e.to_wire()),
    }
}

pub(super) async fn files(State(front): State<Front>, headers: HeaderMap) -> Response {
    if let Err(wire) = authorize(&front, &headers) {
        return DIALECT.error(wire);
    }
    match front.ctx.batches.files() {
        Ok(rows) => {
            let data: Vec<Value> = rows.iter().map(file_object).collect();
            Json(json!({"object": "list", "data": data, "has_more": false})).into_response()
        }
        Err(e) => DIALECT.error(e.to_wire()),
    }
}

pub(super) async fn file(
    State(front): State<Front>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(wire) = authorize(&front, &headers) {
        return DIALECT.error(wire);
    }
    match front.ctx.batches.file(&id) {
        Ok(Some(row)) => Json(file_object(&row)).into_response(),
        Ok(None) => match made_file(&front, &id) {
            Some((job, text)) => Json(json!({"id": id, "object": "file", "bytes": text.len(),
                "created_at": job.finished_s.unwrap_or(job.created_s), "filename": format!("{id}.jsonl"),
                "purpose": "batch_output", "status": "processed"}))
            .into_response(),
            None => not_found("file", &id),
        },
        Err(e) => DIALECT.error(e.to_wire()),
    }
}

pub(super) async fn content(
    State(front): State<Front>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(wire) = authorize(&front, &headers) {
        return DIALECT.error(wire);
    }
    let jsonl = [("content-type", "application/jsonl")];
    match front.ctx.batches.file_content(&id) {
        Ok(Some(bytes)) => (jsonl, bytes).into_response(),
        Ok(None) => match made_file(&front, &id) {
            Some((_, text)) => (jsonl, text).into_response(),
            None => not_found("file", &id),
        },
        Err(e) => DIALECT.error(e.to_wire()),
    }
}

pub(super) async fn delete_file(
    State(front): State<Front>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(wire) = authorize(&front, &headers) {
        return DIALECT.error(wire);
    }
    match front.ctx.batches.delete_file(&id) {
        Ok(true) => Json(json!({"id": id, "object": "file", "deleted": true})).into_response(),
        Ok(false) => not_found("file", &id),
        Err(e) => DIALECT.error(e.to_wire()),
    }
}

/// A job's output (`file-out-…`) or error (`file-err-…`) file, made from its lines.
fn made_file(front: &Front, id: &str) -> Option<(BatchJob, String)> {
    let (job_id, errors) = match (id.strip_prefix("file-out-"), id.strip_prefix("file-err-")) {
        (Some(job), _) => (job, false),
        (_, Some(job)) => (job, true),
        _ => return None,
    };
    let job = front.ctx.batches.status(job_id).ok()?;
    let mut text = String::new();
    front
        .ctx
        .batches
        .each_line(job_id, |line| {
            let parse = LineRow::json;
            let entry = match (line.state.as_str(), errors) {
                ("done", false) => json!({"id": format!("batch_req_{}", line.seq), "custom_id": line.custom_id,
                    "response": {"status_code": 200, "request_id": format!("{job_id}-{}", line.seq), "body": parse(&line.result)},
                    "error": null}),
                ("failed", true) => {
                    let error = parse(&line.error);
                    let code = serde_json::from_value::<WireError>(error.clone())
                        .map_or(ErrorCode::Internal, |w| w.code);
                    json!({"id": format!("batch_req_{}", line.seq), "custom_id": line.custom_id,
                        "response": {"status_code": status_of(code).as_u16(), "request_id": format!("{job_id}-{}", line.seq),
                            "body": {"error": error}},
                        "error": null})
                }
                ("cancelled", true) => json!({"id": format!("batch_req_{}", line.seq), "custom_id": line.custom_id,
                    "response": null, "error": {"code": "batch_cancelled", "message": "the batch was cancelled before this request ran"}}),
                _ => return,
            };
            text.push_str(&entry.to_string());
            text.push('\n');
        })
        .ok()?;
    Some((job, text))
}

/// A job as OpenAI's Batch object, with what the API was told when it was made.
fn batch_object(job: &BatchJob, made: &Value) -> Value {
    let status = match job.state {
        BatchState::Running | BatchState::Paused | BatchState::Unknown => "in_progress",
        BatchState::Completed => "completed",
        BatchState::Cancelled => "cancelled",
    };
    let ended = matches!(job.state, BatchState::Completed | BatchState::Cancelled);
    let (completed_at, cancelled_at) = match job.state {
        BatchState::Completed => (job.finished_s, None),
        BatchState::Cancelled => (None, job.finished_s),
        _ => (None, None),
    };
    json!({
        "id": job.job_id, "object": "batch",
        "endpoint": made["endpoint"], "input_file_id": made["input_file_id"],
        "completion_window": made["completion_window"], "metadata": made["metadata"],
        "status": status, "errors": null,
        "output_file_id": (ended && job.done > 0).then(|| output_id(&job.job_id)),
        "error_file_id": (ended && job.failed > 0).then(|| errors_id(&job.job_id)),
        "created_at": job.created_s, "in_progress_at": job.created_s,
        "completed_at": completed_at, "cancelled_at": cancelled_at,
        "expires_at": null, "failed_at": null, "expired_at": null, "finalizing_at": null, "cancelling_at": null,
        "request_counts": {"total": job.total, "completed": job.done, "failed": job.failed},
    })
}

pub(super) async fn create(
    State(front): State<Front>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(wire) = authorize(&front, &headers) {
        return DIALECT.error(wire);
    }
    let body = match parse_object(&body) {
        Ok(body) => body,
        Err(wire) => return DIALECT.error(wire),
    };
    let endpoint = body["endpoint"].as_str().unwrap_or_default();
    if !ENDPOINTS.contains(&endpoint) {
        return DIALECT.error_about(
            WireError::bad_request(format!(
                "lmsd runs batches of {} only, not {endpoint:?}",
                ENDPOINTS.join(" or ")
            )),
            Some("endpoint"),
        );
    }
    let Some(file_id) = body["input_file_id"].as_str() else {
        return DIALECT.error_about(
            WireError::bad_request("input_file_id is missing"),
            Some("input_file_id"),
        );
    };
    let content = match front.ctx.batches.file_content(file_id) {
        Ok(Some(content)) => content,
        Ok(None) => return not_found("file", file_id),
        Err(e) => return DIALECT.error(e.to_wire()),
    };
    let Ok(lines) = String::from_utf8(content) else {
        return DIALECT.error_about(
            WireError::bad_request("the input file is not UTF-8 text"),
            Some("input_file_id"),
        );
    };
    // Every request must be for the batch's endpoint, as OpenAI requires.
    let elsewhere = lines.lines().enumerate().find_map(|(n, line)| {
        let url = serde_json::from_str::<Value>(line).ok()?["url"]
            .as_str()?
            .to_owned();
        (url != endpoint).then(|| {
            format!(
                "line {}: url {url:?} is not the batch's endpoint {endpoint}",
                n + 1
            )
        })
    });
    if let Some(why) = elsewhere {
        return DIALECT.error_about(WireError::bad_request(why), Some("input_file_id"));
    }
    let made = json!({"endpoint": endpoint, "input_file_id": file_id,
        "completion_window": body["completion_window"].as_str().unwrap_or("24h"),
        "metadata": body["metadata"]});
    let submit = BatchSubmitRequest {
        lines,
        name: Some(format!("OpenAI batch of {file_id}")),
        ..BatchSubmitRequest::default()
    };
    match front.ctx.batches.submit(submit, Some(made.clone())).await {
        Ok(job) => Json(batch_object(&job, &made)).into_response(),
        Err(e) => DIALECT.error_about(e.to_wire(), Some("input_file_id")),
    }
}

fn batch_of(front: &Front, id: &str) -> Response {
    let made = match front.ctx.batches.openai_of(id) {
        Ok(Some(made)) => made,
        Ok(None) => return not_found("batch", id),
        Err(e) => return DIALECT.error(e.to_wire()),
    };
    match front.ctx.batches.status(id) {
        Ok(job) => Json(batch_object(&job, &made)).into_response(),
        Err(e) => DIALECT.error(e.to_wire()),
    }
}

pub(super) async fn get(
    State(front): State<Front>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(wire) = authorize(&front, &headers) {
        return DIALECT.error(wire);
    }
    batch_of(&front, &id)
}

pub(super) async fn list(State(front): State<Front>, headers: HeaderMap) -> Response {
    if let Err(wire) = authorize(&front, &headers) {
        return DIALECT.error(wire);
    }
    let jobs = match front.ctx.batches.list() {
        Ok(jobs) => jobs,
        Err(e) => return DIALECT.error(e.to_wire()),
    };
    // Newest first, as OpenAI lists them; only the batches made through this API.
    let data: Vec<Value> = jobs
        .iter()
        .rev()
        .filter_map(|job| {
            let made = front.ctx.batches.openai_of(&job.job_id).ok()??;
            Some(batch_object(job, &made))
        })
        .collect();
    Json(
        json!({"object": "list", "first_id": data.first().map(|b| b["id"].clone()),
        "last_id": data.last().map(|b| b["id"].clone()), "has_more": false, "data": data}),
    )
    .into_response()
}

pub(super) async fn cancel(
    State(front): State<Front>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(wire) = authorize(&front, &headers) {
        return DIALECT.error(wire);
    }
    if let Ok(None) = front.ctx.batches.openai_of(&id) {
        return not_found("batch", &id);
    }
    if let Err(e) = front.ctx.batches.cancel(&id) {
        return DIALECT.error(e.to_wire());
    }
    batch_of(&front, &id)
}
