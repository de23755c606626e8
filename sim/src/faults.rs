//! Fault injection: tests switch on failures per route, for a number of requests or until cleared.

use std::time::Duration;

/// Which endpoint a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Models,
    Load,
    Unload,
    Chat,
    /// `/v1/chat/completions`, the OpenAI-compatible chat.
    Completions,
    Embeddings,
    Any,
}

/// What goes wrong.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Answer with this HTTP status and a v1 JSON error body.
    Status(u16),
    /// Answer 200 with a v1 error body, as LM Studio does for some failures.
    ErrorWith200,
    /// Answer 500 with an HTML page instead of JSON.
    Html500,
    /// Answer 200 with a body that is not valid JSON.
    MalformedJson,
    /// Wait this long, then answer normally.
    Delay(Duration),
    /// Close the connection without a complete answer.
    DropConnection,
    /// Unload answers success but leaves the instance loaded.
    IgnoreUnload,
    /// A non-streamed chat answers with no output items at all.
    EmptyOutput,
    /// A streamed chat sends a couple of deltas, then nothing more, never ending.
    StallStream,
    /// The next load on this route (Load, or a JIT load through Chat or Embeddings) gets this
    /// context length whatever was asked, as MLX context auto-fit does. Used up by a load only.
    ContextAutoFit(u32),
    /// A load fails as LM Studio reports an engine crash, a CUDA OOM included: 500
    /// `model_load_failed` with no memory wording. Nothing loads.
    LoadFailed,
    /// The instance a chat or embeddings request names crashes: it is removed, and the request
    /// gets the "The model has crashed…" error.
    Crash,
    /// A load completes (the instance exists afterwards), then the connection closes with no reply.
    DropLoadReply,
    /// A request arriving on a keep-alive connection that has already served one is answered by
    /// closing the connection, unwritten and with no effect: Node closing an idle socket just as
    /// the request arrives. Requests on fresh connections pass and do not use it up.
    CloseReused,
    /// Unload: the instance is removed first (as a TTL, auto-evict or crash would have done a
    /// moment earlier), then the unload is answered 400 `invalid_request` "No model found…".
    GoneBeforeUnload,
    /// `/v1/chat/completions` with a schema: the model answers in prose around its JSON, as
    /// unconstrained small models do.
    Prose,
    /// … wraps its JSON in a Markdown code fence.
    Fenced,
    /// … stops half-way through its JSON.
    InvalidJson,
    /// … answers a label outside the schema's `enum` (or `null` for other schemas).
    OffLabel,
}

impl Fault {
    /// Faults taken where they apply (a load, a reused connection), not when a request arrives.
    fn is_deferred(&self) -> bool {
        matches!(self, Fault::ContextAutoFit(_) | Fault::CloseReused)
    }
}

/// How many requests a fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Times {
    Once,
    N(u32),
    Always,
}

#[derive(Debug, Clone)]
pub(crate) struct FaultRule {
    pub route: Route,
    pub fault: Fault,
    pub remaining: Option<u32>,
}

impl FaultRule {
    pub fn new(route: Route, fault: Fault, times: Times) -> Self {
        let remaining = match times {
            Times::Once => Some(1),
            Times::N(n) => Some(n),
            Times::Always => None,
        };
        FaultRule {
            route,
            fault,
            remaining,
        }
    }
}

/// Takes the first fault for a request arriving on `route`, counting it down and dropping spent
/// rules. Deferred faults are left for [`take_fault_where`].
pub(crate) fn take_fault(rules: &mut Vec<FaultRule>, route: Route) -> Option<Fault> {
    take_fault_where(rules, route, |fault| !fault.is_deferred())
}

/// Takes the first fault matching `route` that `pick` accepts.
pub(crate) fn take_fault_where(
    rules: &mut Vec<FaultRule>,
    route: Route,
    pick: impl Fn(&Fault) -> bool,
) -> Option<Fault> {
    let index = rules
        .iter()
        .position(|r| (r.route == route || r.route == Route::Any) && pick(&r.fault))?;
    let rule = &mut rules[index];
    let fault = rule.fault.clone();
    if let Some(remaining) = rule.remaining.as_mut() {
        *remaining -= 1;
        if *remaining == 0 {
            rules.remove(index);
        }
    }
    Some(fault)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_faults_run_out_and_any_matches_every_route() {
        let mut rules = vec![
            FaultRule::new(Route::Chat, Fault::Html500, Times::N(2)),
            FaultRule::new(Route::Any, Fault::MalformedJson, Times::Always),
        ];
        assert_eq!(take_fault(&mut rules, Route::Chat), Some(Fault::Html500));
        assert_eq!(take_fault(&mut rules, Route::Chat), Some(Fault::Html500));
        assert_eq!(
            take_fault(&mut rules, Route::Chat),
            Some(Fault::MalformedJson)
        );
        assert_eq!(
            take_fault(&mut rules, Route::Load),
            Some(Fault::MalformedJson)
        );
        assert_eq!(rules.len(), 1);
    }

    #[test]
    fn deferred_faults_are_only_taken_where_they_apply() {
        let mut rules = vec![
            FaultRule::new(Route::Any, Fault::CloseReused, Times::Once),
            FaultRule::new(Route::Load, Fault::ContextAutoFit(8192), Times::Once),
        ];
        assert_eq!(take_fault(&mut rules, Route::Load), None);
        let auto_fit = |f: &Fault| matches!(f, Fault::ContextAutoFit(_));
        assert_eq!(take_fault_where(&mut rules, Route::Chat, auto_fit), None);
        assert_eq!(
            take_fault_where(&mut rules, Route::Load, auto_fit),
            Some(Fault::ContextAutoFit(8192))
        );
        assert_eq!(
            take_fault_where(&mut rules, Route::Models, |f| *f == Fault::CloseReused),
            Some(Fault::CloseReused)
        );
        assert!(rules.is_empty());
    }
}
