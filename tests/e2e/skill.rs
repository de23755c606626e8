//! Every command the agent skill shows runs against lmsd and the simulator, with the exit code
//! it promises, so the skill cannot drift from the CLI.

use lmstudio_sim::SimConfig;

use crate::support::*;

/// The `lmsd-ctl` command lines of the skill's `sh` blocks, with the exit code each expects.
fn commands(skill: &str) -> Vec<(String, i32)> {
    let mut commands = Vec::new();
    let mut in_sh = false;
    for line in skill.lines() {
        if line.starts_with("```") {
            in_sh = line == "```sh";
            continue;
        }
        if in_sh && line.contains("lmsd-ctl") {
            let (command, expected) = match line.split_once("# exit ") {
                Some((command, code)) => {
                    (command.trim(), code.trim().parse().expect("an exit code"))
                }
                None => (line.trim(), 0),
            };
            commands.push((command.to_owned(), expected));
        }
    }
    commands
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_in_the_skill_works() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;
    let skill =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../skill/SKILL.md")).unwrap();
    let commands = commands(&skill);
    assert!(
        commands.len() >= 15,
        "the skill shows its commands: {commands:?}"
    );
    let path = format!(
        "{}:{}",
        ctl_bin().parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for (command, expected) in commands {
        let out = tokio::process::Command::new("sh")
            .args(["-c", &command])
            .env("PATH", &path)
            .env("LMSD_SOCKET", &daemon.socket)
            .output()
            .await
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(expected),
            "{command}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
