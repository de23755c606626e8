//! Model choice for `"model": "auto"`, as a pure function over the catalogue and the pool.

use lmsd_proto::Needs;

use crate::backend::{Model, ModelType};

/// A model to try, and why it was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub model: String,
    pub reason: String,
    /// Its size, when known: after an out-of-memory only smaller candidates are tried.
    pub size_bytes: Option<u64>,
}

/// What choice needs to know of the pool.
#[derive(Debug, Clone, Default)]
pub struct PoolView {
    /// Keys of models with a usable instance.
    pub loaded: Vec<String>,
    pub free_bytes: u64,
    pub budget_bytes: u64,
    /// Memory counted per instance on top of its size.
    pub overhead: u64,
}

fn meets(model: &Model, needs: &Needs, embedding: bool) -> bool {
    let caps = model.capabilities.clone().unwrap_or_default();
    let kind_ok = if embedding {
        model.kind == ModelType::Embedding
    } else {
        model.kind == ModelType::Llm
    };
    kind_ok
        && (!needs.vision || caps.vision)
        && (!needs.reasoning || caps.reasoning.is_some())
        // An engine that does not say (llama-server) leaves every model in.
        && (!needs.tools || model.capabilities.as_ref().is_none_or(|c| c.trained_for_tool_use))
        && needs
            .min_context
            .is_none_or(|min| model.max_context_length.unwrap_or(0) >= min)
}

/// Every model that meets the needs, best first: a loaded one; then one that fits without
/// evicting (smallest first); then the preference order; then the smallest that fits the budget
/// at all. Each comes with the reason it is where it is.
pub fn choose(
    catalogue: &[Model],
    pool: &PoolView,
    needs: &Needs,
    prefer: &[String],
    embedding: bool,
) -> Vec<Candidate> {
    let mut fitting: Vec<&Model> = catalogue
        .iter()
        .filter(|m| meets(m, needs, embedding))
        .collect();
    fitting.sort_by_key(|m| (m.size_bytes, m.key.clone()));
    let mut chosen: Vec<Candidate> = Vec::new();
    let mut add = |model: &Model, reason: &str| {
        if !chosen.iter().any(|c| c.model == model.key) {
            chosen.push(Candidate {
                model: model.key.clone(),
                reason: reason.to_owned(),
                size_bytes: Some(model.size_bytes),
            });
        }
    };
    for model in fitting.iter().filter(|m| pool.loaded.contains(&m.key)) {
        add(model, "a loaded instance meets the needs");
    }
    for model in fitting
        .iter()
        .filter(|m| m.size_bytes + pool.overhead <= pool.free_bytes)
    {
        add(model, "fits in free memory without evicting");
    }
    let within_budget = |m: &&&Model| m.size_bytes + pool.overhead <= pool.budget_bytes;
    for key in prefer {
        if let Some(model) = fitting.iter().filter(within_budget).find(|m| &m.key == key) {
            add(
                model,
                "preferred ([routing] prefer or the task's prefer list)",
            );
        }
    }
    for model in fitting.iter().filter(within_budget) {
        add(model, "the smallest that fits the budget");
    }
    chosen
}

/// Results a model needs in its window before `[routing] min_pass_rate` judges it.
pub const MIN_PASS_SAMPLE: usize = 5;

/// `auto` for a task with a contract: models whose recent pass rate (`rate_of`: the rate and
/// how many results it is over) is below `min` go last, with the reason, rather than out: when
/// all the others fail they are still worth a try, and they need tasks to show they improved.
pub fn demote_unfit(
    list: Vec<Candidate>,
    min: f64,
    rate_of: impl Fn(&str) -> Option<(f64, usize)>,
) -> Vec<Candidate> {
    let (mut fit, unfit): (Vec<_>, Vec<_>) = list.into_iter().partition(|c| {
        rate_of(&c.model).is_none_or(|(rate, count)| count < MIN_PASS_SAMPLE || rate >= min)
    });
    fit.extend(unfit.into_iter().map(|mut c| {
        if let Some((rate, count)) = rate_of(&c.model) {
            c.reason = format!(
                "tried last: it kept {:.0}% of its last {count} contracts, below [routing] min_pass_rate {:.0}%",
                rate * 100.0,
                min * 100.0
            );
        }
        c
    }));
    fit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_below_the_pass_rate_go_last_once_judged() {
        let candidate = |model: &str| Candidate {
            model: model.into(),
            reason: "fits".into(),
            size_bytes: None,
        };
        let list = vec![
            candidate("poor"),
            candidate("new"),
            candidate("young"),
            candidate("good"),
        ];
        let rates = |model: &str| match model {
            "poor" => Some((0.4, 10)),
            "young" => Some((0.0, MIN_PASS_SAMPLE - 1)),
            "good" => Some((0.9, 20)),
            _ => None,
        };
        let ordered = demote_unfit(list, 0.8, rates);
        assert_eq!(keys(&ordered), ["new", "young", "good", "poor"]);
        assert!(
            ordered[3].reason.contains("kept 40% of its last 10"),
            "{}",
            ordered[3].reason
        );
        assert_eq!(ordered[0].reason, "fits");
    }

    fn catalogue() -> Vec<Model> {
        serde_json::from_str(
            r#"[{"type":"llm","key":"small","size_bytes":2000,"max_context_length":8192,"capabilities":{"vision":false}},
                {"type":"llm","key":"vision","size_bytes":3000,"max_context_length":32768,"capabilities":{"vision":true}},
                {"type":"llm","key":"thinker","size_bytes":5000,"max_context_length":131072,"capabilities":{"vision":false,"reasoning":{"allowed_options":["on"],"default":"on"}}},
                {"type":"llm","key":"huge","size_bytes":50000,"max_context_length":131072,"capabilities":{"vision":true}},
                {"type":"embedding","key":"embed","size_bytes":300,"max_context_length":2048}]"#,
        )
        .unwrap()
    }

    fn keys(candidates: &[Candidate]) -> Vec<&str> {
        candidates.iter().map(|c| c.model.as_str()).collect()
    }

    #[test]
    fn a_loaded_model_that_meets_the_needs_comes_first() {
        let pool = PoolView {
            loaded: vec!["thinker".into()],
            free_bytes: 10_000,
            budget_bytes: 20_000,
            overhead: 0,
        };
        let chosen = choose(&catalogue(), &pool, &Needs::default(), &[], false);
        assert_eq!(keys(&chosen), ["thinker", "small", "vision"]);
        assert_eq!(chosen[0].reason, "a loaded instance meets the needs");
        assert_eq!(chosen[1].reason, "fits in free memory without evicting");
    }

    #[test]
    fn needs_filter_by_vision_context_reasoning_and_kind() {
        let pool = PoolView {
            loaded: vec![],
            free_bytes: 100_000,
            budget_bytes: 100_000,
            overhead: 0,
        };
        let vision = Needs {
            vision: true,
            ..Needs::default()
        };
        assert_eq!(
            keys(&choose(&catalogue(), &pool, &vision, &[], false)),
            ["vision", "huge"]
        );
        let long = Needs {
            min_context: Some(100_000),
            ..Needs::default()
        };
        assert_eq!(
            keys(&choose(&catalogue(), &pool, &long, &[], false)),
            ["thinker", "huge"]
        );
        let reasoning = Needs {
            reasoning: true,
            ..Needs::default()
        };
        assert_eq!(
            keys(&choose(&catalogue(), &pool, &reasoning, &[], false)),
            ["thinker"]
        );
        assert_eq!(
            keys(&choose(&catalogue(), &pool, &Needs::default(), &[], true)),
            ["embed"]
        );
    }

    #[test]
    fn preference_beats_size_when_nothing_fits_freely_and_the_budget_bounds_all() {
        let pool = PoolView {
            loaded: vec![],
            free_bytes: 1000,
            budget_bytes: 6000,
            overhead: 0,
        };
        let chosen = choose(
            &catalogue(),
            &pool,
            &Needs::default(),
            &["thinker".into(), "huge".into()],
            false,
        );
        assert_eq!(keys(&chosen), ["thinker", "small", "vision"]);
        assert!(chosen[0].reason.starts_with("preferred"));
        assert_eq!(chosen[1].reason, "the smallest that fits the budget");
    }
}
