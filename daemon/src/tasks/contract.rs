//! Output contracts: what a chat's answer must be — one JSON value valid against a schema, one
//! of some labels, or any JSON object — the schema the engine is constrained with, and lmsd's
//! own check of every answer, whatever the engine enforced.

use lmsd_proto::{ChatRequest, ContractKind};
use serde_json::{json, Value};

/// The largest schema taken, as JSON text: a bigger one is refused before the task queues (the
/// engine compiles it into a grammar for every answer).
pub const MAX_SCHEMA_BYTES: usize = 64 * 1024;
/// The most labels a `choices` contract may have.
pub const MAX_CHOICES: usize = 256;
/// The one key of the object a constrained engine answers a `choices` contract with.
const LABEL: &str = "label";
/// Problems reported of one answer, at most: the rest are counted.
const MAX_PROBLEMS: usize = 10;

/// A chat's contract, checked and ready: made once per task, before it queues.
#[derive(Debug)]
pub struct Contract {
    rule: Rule,
    /// What the engine is constrained with.
    engine_schema: Value,
}

#[derive(Debug)]
enum Rule {
    Schema(Box<jsonschema::Validator>),
    Choices(Vec<String>),
    JsonObject,
}

impl Contract {
    /// The contract a chat carries, if any; a contract that cannot be kept (two at once, a
    /// schema that is not one or too large, empty or repeated labels) is the reason why.
    pub fn of(chat: &ChatRequest) -> Result<Option<Contract>, String> {
        let given = [
            chat.schema.is_some(),
            !chat.choices.is_empty(),
            chat.json_object,
        ];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err(
                "a chat takes one contract: schema, choices or json_object, not several".into(),
            );
        }
        if let Some(schema) = &chat.schema {
            return Self::schema(schema).map(Some);
        }
        if !chat.choices.is_empty() {
            return Self::choices(&chat.choices).map(Some);
        }
        Ok(chat.json_object.then(Contract::json_object))
    }

    /// Any JSON object.
    pub fn json_object() -> Contract {
        Contract {
            rule: Rule::JsonObject,
            engine_schema: json!({"type": "object"}),
        }
    }

    /// One JSON value valid against `schema`; a schema that cannot be kept is the reason why.
    pub fn schema(schema: &Value) -> Result<Contract, String> {
        let size = schema.to_string().len();
        if size > MAX_SCHEMA_BYTES {
            return Err(format!(
                "the schema is {size} bytes of JSON; lmsd takes schemas of up to {MAX_SCHEMA_BYTES}"
            ));
        }
        if !schema.is_object() {
            return Err(
                "the schema must be a JSON Schema: an object such as {\"type\":\"object\", …}"
                    .into(),
            );
        }
        let validator = jsonschema::validator_for(schema).map_err(|error| {
            format!("the schema is not a valid JSON Schema, or refers to one lmsd cannot read (it fetches no $ref from files or the network): {error}")
        })?;
        Ok(Contract {
            rule: Rule::Schema(Box::new(validator)),
            engine_schema: schema.clone(),
        })
    }

    fn choices(choices: &[String]) -> Result<Contract, String> {
        if choices.len() > MAX_CHOICES {
            return Err(format!(
                "{} choices; lmsd takes up to {MAX_CHOICES}",
                choices.len()
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for label in choices {
            if label.trim().is_empty() {
                return Err("a choice is empty".into());
            }
            if label.trim() != label {
                return Err(format!(
                    "the choice {label:?} starts or ends with white space"
                ));
            }
            if !seen.insert(label.as_str()) {
                return Err(format!("the choice {label:?} is given twice"));
            }
        }
        // An object around the label: OpenAI's strict schemas must be objects at the root, and
        // whether every engine that copies it takes a bare `enum` is not known.
        Ok(Contract {
            rule: Rule::Choices(choices.to_vec()),
            engine_schema: json!({
                "type": "object",
                "properties": {LABEL: {"type": "string", "enum": choices}},
                "required": [LABEL],
                "additionalProperties": false,
            }),
        })
    }

    pub fn kind(&self) -> ContractKind {
        match self.rule {
            Rule::Schema(_) => ContractKind::Schema,
            Rule::Choices(_) => ContractKind::Choices,
            Rule::JsonObject => ContractKind::JsonObject,
        }
    }

    /// The JSON Schema the engine constrains its answer to (labels become an `enum`).
    pub fn engine_schema(&self) -> &Value {
        &self.engine_schema
    }

    /// The answer as a JSON value when it keeps the contract, else what is wrong with it. One
    /// surrounding Markdown code fence is forgiven; prose around the JSON is not.
    pub fn check(&self, answer: &str) -> Result<Value, Vec<String>> {
        let text = unfenced(answer);
        match &self.rule {
            Rule::Choices(choices) => {
                // Constrained, the label arrives as `{"label": …}`; unconstrained, as a JSON
                // string or bare.
                let label = match serde_json::from_str::<Value>(text) {
                    Ok(Value::Object(mut object)) if object.len() == 1 => {
                        match object.remove(LABEL) {
                            Some(Value::String(label)) => label,
                            _ => text.to_owned(),
                        }
                    }
                    Ok(Value::String(label)) => label,
                    _ => text.to_owned(),
                };
                if choices.contains(&label) {
                    Ok(Value::String(label))
                } else {
                    Err(vec![format!(
                        "{:?} is not one of the choices ({})",
                        clipped(&label),
                        choices.join(", ")
                    )])
                }
            }
            Rule::JsonObject => match parse(text)? {
                value @ Value::Object(_) => Ok(value),
                other => Err(vec![format!(
                    "the answer is JSON but not an object: it is {}",
                    type_name(&other)
                )]),
            },
            Rule::Schema(validator) => {
                let value = parse(text)?;
                let mut problems: Vec<String> = Vec::new();
                let mut more = 0;
                for error in validator.iter_errors(&value) {
                    if problems.len() < MAX_PROBLEMS {
                        let at = error.instance_path().to_string();
                        let at = if at.is_empty() { "/".to_owned() } else { at };
                        problems.push(format!("at {at}: {error}"));
                    } else {
                        more += 1;
                    }
                }
                if more > 0 {
                    problems.push(format!("and {more} more"));
                }
                if problems.is_empty() {
                    Ok(value)
                } else {
                    Err(problems)
                }
            }
        }
    }
}

/// The start of a long answer, for a problem's message (the whole answer is beside it).
fn clipped(text: &str) -> String {
    const SHOWN: usize = 60;
    match text.char_indices().nth(SHOWN) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

fn parse(text: &str) -> Result<Value, Vec<String>> {
    serde_json::from_str(text).map_err(|error| vec![format!("the answer is not JSON: {error}")])
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The text inside one surrounding Markdown code fence (```` ```json … ``` ````), or the text.
fn unfenced(answer: &str) -> &str {
    let text = answer.trim();
    let Some(inner) = text.strip_prefix("```") else {
        return text;
    };
    let Some(inner) = inner.strip_suffix("```") else {
        return text;
    };
    // The fence's info string ("json") runs to the end of its first line.
    match inner.split_once('\n') {
        Some((info, body)) if !info.trim().contains(char::is_whitespace) => body.trim(),
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(contract: impl FnOnce(&mut ChatRequest)) -> ChatRequest {
        let mut chat = ChatRequest::default();
        contract(&mut chat);
        chat
    }

    fn contract(setup: impl FnOnce(&mut ChatRequest)) -> Contract {
        Contract::of(&chat(setup)).unwrap().unwrap()
    }

    #[test]
    fn a_chat_without_a_contract_has_none_and_one_with_two_is_refused() {
        assert!(Contract::of(&ChatRequest::default()).unwrap().is_none());
        let two = chat(|c| {
            c.json_object = true;
            c.choices = vec!["a".into()];
        });
        assert!(Contract::of(&two).unwrap_err().contains("one contract"));
    }

    #[test]
    fn a_schema_answer_is_parsed_validated_and_forgiven_one_fence() {
        let person = contract(|c| {
            c.schema = Some(json!({
                "type": "object",
                "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                "required": ["name", "age"]
            }))
        });
        assert_eq!(person.kind(), ContractKind::Schema);
        let good = json!({"name": "Ada", "age": 36});
        assert_eq!(person.check(r#"{"name":"Ada","age":36}"#), Ok(good.clone()));
        assert_eq!(
            person.check("```json\n{\"name\":\"Ada\",\"age\":36}\n```"),
            Ok(good.clone())
        );
        assert_eq!(
            person.check("```\n{\"name\":\"Ada\",\"age\":36}\n```"),
            Ok(good)
        );
        let wrong = person.check(r#"{"name":"Ada","age":"old"}"#).unwrap_err();
        assert!(wrong[0].starts_with("at /age:"), "{wrong:?}");
        let missing = person.check(r#"{"name":"Ada"}"#).unwrap_err();
        assert!(missing[0].contains("age"), "{missing:?}");
        let prose = person
            .check("Sure! Here it is: {\"name\":\"Ada\",\"age\":36}")
            .unwrap_err();
        assert!(prose[0].starts_with("the answer is not JSON"), "{prose:?}");
        let cut = person.check(r#"{"name":"Ad"#).unwrap_err();
        assert!(cut[0].starts_with("the answer is not JSON"), "{cut:?}");
    }

    #[test]
    fn labels_come_quoted_or_bare_and_nothing_else_passes() {
        let labels = contract(|c| c.choices = vec!["bug".into(), "feature".into()]);
        assert_eq!(
            labels.engine_schema()["properties"]["label"]["enum"],
            json!(["bug", "feature"])
        );
        assert_eq!(labels.check(r#"{"label": "bug"}"#), Ok(json!("bug")));
        assert!(labels.check(r#"{"label": "other"}"#).is_err());
        assert_eq!(labels.check("\"bug\""), Ok(json!("bug")));
        assert_eq!(labels.check(" feature\n"), Ok(json!("feature")));
        let off = labels.check("question").unwrap_err();
        assert!(off[0].contains("\"question\" is not one of the choices (bug, feature)"));
        assert!(labels.check("Bug").is_err(), "labels are exact");
        let rambling = labels.check(&"positive and more ".repeat(100)).unwrap_err();
        assert!(rambling[0].len() < 150, "{rambling:?}");
    }

    #[test]
    fn a_json_object_contract_takes_any_object_only() {
        let object = contract(|c| c.json_object = true);
        assert_eq!(object.check(r#"{"a":[1,2]}"#), Ok(json!({"a": [1, 2]})));
        let array = object.check("[1,2]").unwrap_err();
        assert!(
            array[0].contains("not an object: it is an array"),
            "{array:?}"
        );
    }

    #[test]
    fn schemas_and_labels_that_cannot_be_kept_are_refused_with_the_reason() {
        let refused = |setup: fn(&mut ChatRequest)| Contract::of(&chat(setup)).unwrap_err();
        assert!(
            refused(|c| c.schema = Some(json!({"type": "no-such-type"})))
                .contains("not a valid JSON Schema")
        );
        assert!(
            refused(|c| c.schema = Some(json!({"$ref": "https://example.com/s.json"})))
                .contains("not a valid JSON Schema")
        );
        assert!(refused(|c| c.schema = Some(json!("object"))).contains("must be a JSON Schema"));
        assert!(refused(|c| c.schema = Some(json!(false))).contains("must be a JSON Schema"));
        let big: Vec<String> = (0..MAX_SCHEMA_BYTES / 8)
            .map(|n| format!("v{n:06}"))
            .collect();
        let too_big = Contract::of(&chat(|c| c.schema = Some(json!({"enum": big})))).unwrap_err();
        assert!(too_big.contains("takes schemas of up to"), "{too_big}");
        assert!(refused(|c| c.choices = vec!["a".into(), "a".into()]).contains("given twice"));
        assert!(refused(|c| c.choices = vec!["a".into(), " ".into()]).contains("empty"));
    }
}
