//! Fault injection: tests switch on failures per route, for a number of requests or until cleared.

use std::time::Duration;

/// Which endpoint a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Models,
    Load,
    Unload,
    Chat,
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

/// Takes the first fault matching `route`, counting it down and dropping spent rules.
pub(crate) fn take_fault(rules: &mut Vec<FaultRule>, route: Route) -> Option<Fault> {
    let index = rules
        .iter()
        .position(|r| r.route == route || r.route == Route::Any)?;
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
}
