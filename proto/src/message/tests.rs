//! The wire types against their documented lines.

use super::*;
use crate::error::ErrorCode;
use crate::task::Priority;
use crate::PROTOCOL_VERSION;
use serde_json::Value;

fn parse(line: &str) -> Result<Envelope, Rejection> {
    parse_request(line.as_bytes())
}

#[test]
fn documented_request_examples_parse() {
    let status = parse(r#"{"v":1,"id":"s1","type":"status"}"#).unwrap();
    assert_eq!(status.id, "s1");
    assert_eq!(status.request, Request::Status);

    let chat = parse(
            r#"{"v":1,"id":"c1","type":"chat","model":"qwen/qwen3-4b","input":"Summarise: ...","temperature":0.2,"max_output_tokens":200,"stream":true}"#,
        )
        .unwrap();
    let Request::Chat(chat) = chat.request else {
        panic!("not a chat")
    };
    assert_eq!(chat.model, "qwen/qwen3-4b");
    assert!(chat.stream);
    assert_eq!(chat.max_output_tokens, Some(200));

    let auto = parse(
            r#"{"v":1,"id":"c2","type":"chat","model":"auto","input":"Describe","needs":{"vision":true,"min_context":8192},"priority":"batch","timeout":"90s","session":"review"}"#,
        )
        .unwrap();
    let Request::Chat(auto) = auto.request else {
        panic!("not a chat")
    };
    assert!(auto.options.needs.vision);
    assert_eq!(auto.options.needs.min_context, Some(8192));
    assert_eq!(auto.options.priority, Priority::Batch);
    assert_eq!(auto.options.timeout.map(|t| t.0.as_secs()), Some(90));
    assert_eq!(auto.session.as_deref(), Some("review"));

    let unload =
        parse(r#"{"v":1,"id":"u1","type":"unload","instance_id":"qwen/qwen3-4b:2"}"#).unwrap();
    assert_eq!(
        unload.request,
        Request::Unload(UnloadRequest {
            model: None,
            instance_id: Some("qwen/qwen3-4b:2".into()),
            all: false,
        })
    );
}

#[test]
fn a_load_takes_its_settings_beside_the_model_and_refuses_a_misspelt_one() {
    let load = parse(
        r#"{"v":1,"id":"l1","type":"load","model":"m","context_length":8192,"flash_attention":true,"ttl":"15m"}"#,
    )
    .unwrap();
    let Request::Load(load) = load.request else {
        panic!("not a load")
    };
    assert_eq!(load.settings.context_length, Some(8192));
    assert_eq!(load.settings.flash_attention, Some(true));
    assert!(load.ttl.is_some());
    let rejected =
        parse(r#"{"v":1,"id":"l2","type":"load","model":"m","context_lenght":8192}"#).unwrap_err();
    assert!(
        rejected.error.message.contains("context_lenght"),
        "{}",
        rejected.error.message
    );
}

#[test]
fn envelope_serializes_to_a_parseable_line() {
    let envelope = Envelope {
        v: PROTOCOL_VERSION,
        id: "x".into(),
        request: Request::Load(LoadRequest {
            model: "m".into(),
            settings: LoadSettings {
                context_length: Some(4096),
                ..LoadSettings::default()
            },
            ..Default::default()
        }),
    };
    let line = serde_json::to_vec(&envelope).unwrap();
    assert_eq!(parse_request(&line).unwrap(), envelope);
}

#[test]
fn rejections_carry_the_id_when_readable() {
    let r = parse(r#"{"v":2,"id":"a","type":"status"}"#).unwrap_err();
    assert_eq!(r.id.as_deref(), Some("a"));
    assert_eq!(r.error.code, ErrorCode::UnsupportedVersion);

    let r = parse(r#"{"v":1,"id":"b","type":"frobnicate"}"#).unwrap_err();
    assert_eq!(r.id.as_deref(), Some("b"));
    assert_eq!(r.error.code, ErrorCode::BadRequest);

    let r = parse(r#"{"v":1,"id":"c","type":"chat","model":"m","input":"x","max_tokens":5}"#)
        .unwrap_err();
    assert!(
        r.error.message.contains("max_tokens"),
        "{}",
        r.error.message
    );

    let r =
        parse(r#"{"v":1,"id":"p","type":"chat","model":"auto","input":"x","priority":"urgent"}"#)
            .unwrap_err();
    assert!(r.error.message.contains("urgent"), "{}", r.error.message);

    let r = parse(r#"{"v":1,"id":"d","type":"unload"}"#).unwrap_err();
    assert!(r.error.message.contains("exactly one"));

    let r = parse("{not json").unwrap_err();
    assert_eq!(r.id, None);
    assert_eq!(r.error.code, ErrorCode::BadRequest);

    let r = parse_request(b"{\"v\":1,\"id\":\"\xff\"}").unwrap_err();
    assert_eq!(r.error.code, ErrorCode::BadRequest);

    let r = parse(r#"[1,2]"#).unwrap_err();
    assert!(r.error.message.contains("object"));
}

#[test]
fn an_event_from_a_newer_daemon_reads_as_unknown_and_the_new_fields_are_optional() {
    let golden = r#"{"id":"e1","type":"event","event":"gpu_melted","degrees":900}"#;
    let event: Reply = serde_json::from_str(golden).unwrap();
    assert_eq!(event, Reply::event("e1".into(), Event::Unknown));
    let mismatch = r#"{"id":"e1","type":"event","event":"context_mismatch","model":"m","instance_id":"m","requested":16384,"loaded":4096}"#;
    assert!(matches!(
        serde_json::from_str::<Reply>(mismatch).unwrap().body,
        ReplyBody::Event(Event::ContextMismatch { loaded: 4096, .. })
    ));
    // A chat line from an older client, without `store`, still parses.
    let chat = parse(r#"{"v":1,"id":"c","type":"chat","model":"m","input":"x"}"#).unwrap();
    assert!(matches!(
        chat.request,
        Request::Chat(ChatRequest { store: false, .. })
    ));
}

#[test]
fn replies_round_trip_with_their_documented_shape() {
    let reply = Reply::result(
        "c1".into(),
        Outcome::Chat(ChatOutcome {
            content: "hi".into(),
            content_source: ContentSource::Message,
            model_instance_id: "m".into(),
            response_id: Some("resp_1".into()),
            usage: Usage {
                input_tokens: 3,
                total_output_tokens: 1,
                reasoning_output_tokens: 0,
                model_load_time_seconds: None,
            },
            json: None,
            contract: None,
            task: TaskReport {
                task_id: "t1".into(),
                model: "m".into(),
                reason: "requested".into(),
                total_ms: 7,
                attempts: 1,
                ..TaskReport::default()
            },
        }),
    );
    let json: Value = serde_json::to_value(&reply).unwrap();
    assert_eq!(json["type"], "result");
    assert_eq!(json["kind"], "chat");
    assert_eq!(json["content_source"], "message");
    assert_eq!(serde_json::from_value::<Reply>(json).unwrap(), reply);

    let golden = r#"{"id":"c1","type":"event","event":"delta","content":"Hel"}"#;
    let event: Reply = serde_json::from_str(golden).unwrap();
    assert_eq!(
        event,
        Reply::event(
            "c1".into(),
            Event::Delta {
                content: "Hel".into()
            }
        )
    );
    assert!(!event.is_terminal());

    let golden =
        r#"{"id":null,"type":"error","error":{"code":"bad_request","message":"invalid JSON"}}"#;
    let error: Reply = serde_json::from_str(golden).unwrap();
    assert!(error.is_terminal());
    assert_eq!(serde_json::to_string(&error).unwrap(), golden);
}
