//! README.md's walkthrough, run as a new user would: every `$ command` in it is run for
//! real (a relay on the embedded default in a fresh directory, clients with their own
//! config and runtime directories), in order, and what the command prints on the
//! terminal is compared line by line with the lines under it in the README. `…` in the
//! README stands for hex (keys, tokens); timestamps, the relay's port and the address in
//! invites are the only other things allowed to differ.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use overlan_integration_tests::*;

/// The README's address and port in invites, for whatever this machine gives.
const README_HOST: &str = "192.168.1.20";
const README_PORT: &str = "7700";

/// One `$ command` of the walkthrough with the lines printed under it.
#[derive(Debug)]
struct Step {
    command: String,
    printed: Vec<String>,
}

/// The `$ ` commands of the walkthrough section and their printed lines (indented code
/// lines up to a blank line, prose or the next command).
fn walkthrough() -> Vec<Step> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let start = readme.find("## Five-minute walkthrough").expect("the walkthrough section");
    let section = &readme[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let mut steps: Vec<Step> = Vec::new();
    let mut open = false;
    for line in section.lines() {
        if let Some(command) = line.strip_prefix("    $ ") {
            steps.push(Step { command: command.to_owned(), printed: Vec::new() });
            open = true;
        } else if let (true, Some(printed)) = (open, line.strip_prefix("    ")) {
            steps.last_mut().expect("open").printed.push(printed.trim_end().to_owned());
        } else {
            open = false;
        }
    }
    steps
}

/// Whether `actual` is what the README's `expected` line shows: `…` with the hex
/// around it is any hex, a timestamp any timestamp.
fn shows(expected: &str, actual: &str) -> bool {
    let time = regex::Regex::new(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?Z)?").unwrap();
    let expected = time.replace_all(expected, "\u{1}");
    let actual = time.replace_all(actual, "\u{1}");
    let hex = regex::Regex::new("[0-9a-f]*…[0-9a-f]*").unwrap();
    let mut pattern = String::from("^");
    let mut last = 0;
    for m in hex.find_iter(&expected) {
        pattern.push_str(&regex::escape(&expected[last..m.start()]));
        pattern.push_str("[0-9a-f]+");
        last = m.end();
    }
    pattern.push_str(&regex::escape(&expected[last..]));
    pattern.push('$');
    regex::Regex::new(&pattern).unwrap().is_match(&actual)
}

/// What this machine printed, in README terms: the relay's port and the address in
/// its invites as the README's.
fn as_readme(line: &str, host: &str, port: u16) -> String {
    line.replace(&format!("{host}:{port}"), &format!("{README_HOST}:{README_PORT}"))
        .replace(&format!("0.0.0.0:{port}"), &format!("0.0.0.0:{README_PORT}"))
}

/// A walkthrough command as a process in `dir`, with this user's own config and runtime
/// directories there (an identity made on first use, as for a new user).
fn command(dir: &Path, line: &str, invite: Option<&str>, port: u16) -> tokio::process::Command {
    let mut words = line.split_whitespace();
    let program = words.next().unwrap();
    let mut cmd = tokio::process::Command::new(bin(program));
    cmd.args(words).current_dir(dir);
    for key in
        ["OVERLAN_INVITE", "OVERLAN_NAME", "OVERLAN_IDENTITY", "OVERLAN_CONFIG", "OVERLAN_LOG", "OVERLAN_DATA_DIR"]
    {
        cmd.env_remove(key);
    }
    cmd.env("XDG_CONFIG_HOME", dir.join("config"))
        .env("XDG_RUNTIME_DIR", dir.join("run"))
        .env("OVERLAN_LISTEN", format!("0.0.0.0:{port}"));
    if let Some(invite) = invite {
        cmd.env("OVERLAN_INVITE", invite);
    }
    cmd
}

async fn run(cmd: tokio::process::Command) -> (i32, Vec<String>) {
    let mut cmd = cmd;
    let out = within("a walkthrough command", cmd.output()).await.unwrap();
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
    lines.extend(String::from_utf8_lossy(&out.stderr).lines().map(str::to_owned));
    (out.status.code().unwrap_or(-1), lines)
}

#[tokio::test]
async fn the_readme_walkthrough_prints_what_the_readme_shows() {
    bin("overlan");
    let steps = walkthrough();
    assert!(steps.len() >= 12, "walkthrough commands not found: {steps:?}");
    let dir = tempfile::tempdir().unwrap();
    let dir: PathBuf = dir.path().to_path_buf();
    let port = std::net::UdpSocket::bind("0.0.0.0:0").unwrap().local_addr().unwrap().port();
    let cmd = |line: &str, invite: Option<&str>| command(&dir, line, invite, port);
    // What each command printed on its terminal, by command line.
    let mut printed: HashMap<&str, Vec<String>> = HashMap::new();

    // 1. The relay, on the embedded default, in an empty directory.
    let mut relay = Proc::spawn(cmd("overlan-server", None));
    let log = relay.stderr_until("").await;
    let (listen, fingerprint, invite_line) =
        (relay.stdout_line().await, relay.stdout_line().await, relay.stdout_line().await);
    let invite = invite_line.strip_prefix("invite ").expect("invite line").to_owned();
    let host = invite.trim_start_matches("overlan://").split(':').next().unwrap().to_owned();
    printed.insert("overlan-server", vec![log, listen, fingerprint, invite_line]);
    let invite_uri = invite.clone();
    let invite = Some(invite.as_str());

    // 2. Alice's session, Bob's VIP.
    let mut alice = Proc::spawn(cmd("overlan --name alice up", invite));
    let vip = alice.stdout_line().await;
    let joined = alice.stderr_until("joined").await;
    printed.insert("overlan --name alice up", vec![vip, joined]);
    let (code, lines) = run(cmd("overlan --name bob ip", invite)).await;
    assert_eq!(code, 0, "{lines:?}");
    printed.insert("overlan --name bob ip", lines);

    // 3. A stream: Alice types a line, Bob sees it; Ctrl-D on both, both exit 0.
    let mut bob = Proc::spawn(cmd("overlan --name bob nc -l 7000", invite));
    let listening = bob.stderr_until("listening on").await;
    let mut talker = Proc::spawn(cmd("overlan --name alice nc 10.77.0.3 7000", invite));
    let connection = bob.stderr_until("connection from").await;
    talker.write_stdin(b"hello bob\n").await;
    let seen = bob.stdout_line().await;
    printed.insert("overlan --name bob nc -l 7000", vec![listening, connection, seen]);
    printed.insert("overlan --name alice nc 10.77.0.3 7000", vec!["hello bob".to_owned()]);
    talker.close_stdin();
    bob.close_stdin();
    assert_eq!(talker.wait().await.0, 0);
    assert_eq!(bob.wait().await.0, 0);
    for line in ["overlan --name bob nc 10.77.0.2 7001", "overlan --name bob nc 10.77.9.9 7000"] {
        let mut c = cmd(line, invite);
        c.stdin(std::process::Stdio::null());
        let (code, lines) = run(c).await;
        assert_eq!(code, 1, "{line}: {lines:?}");
        printed.insert(line, lines);
    }

    // 4. A broadcast from game3 reaches game1 and game2.
    let game = |n: u8| format!("overlan --name game{n} nc -u -b --show-source 4445");
    let (l1, l2, l3) = (game(1), game(2), game(3));
    let mut games = Vec::new();
    for line in [&l1, &l2, &l3] {
        let mut g = Proc::spawn(cmd(line, invite));
        let bound = g.stderr_until("bound").await;
        games.push((g, vec![bound]));
    }
    games[2].0.write_stdin(b"lobby open\n").await;
    games[2].1.push("lobby open".to_owned());
    for (g, lines) in &mut games[..2] {
        lines.push(within("the broadcast", g.stdout_line()).await);
    }
    for ((mut g, lines), line) in games.into_iter().zip([&l1, &l2, &l3]) {
        printed.insert(line, lines);
        let _ = g.child.start_kill();
    }

    // 5. The operator's commands, beside the running relay.
    for line in [
        "overlan-server network add games --subnet 10.88.0.0/24",
        "overlan-server invite games --uses 5 --expires 7d --label lan-party",
        "overlan-server invite list",
        "overlan-server invite revoke 2",
    ] {
        let (code, lines) = run(cmd(line, None)).await;
        assert_eq!(code, 0, "{line}: {lines:?}");
        printed.insert(line, lines);
    }
    let _ = alice.child.start_kill();
    let _ = relay.child.start_kill();

    // Compare, command by command, in the README's order.
    let mut compared = 0;
    for step in &steps {
        if let Some(value) = step.command.strip_prefix("export OVERLAN_INVITE=") {
            let shown = value.trim_matches('\'');
            let actual = as_readme(&invite_uri, &host, port);
            assert!(shows(shown, &actual), "README's invite {shown}\n   is not the form of {actual}");
            continue;
        }
        let actual = printed
            .get(step.command.as_str())
            .unwrap_or_else(|| panic!("the README runs `{}`, which this test does not: add it", step.command));
        let actual: Vec<String> = actual.iter().map(|l| as_readme(l, &host, port)).collect();
        assert_eq!(
            step.printed.len(),
            actual.len(),
            "`{}`: the README shows {:#?}\nbut it printed {:#?}",
            step.command,
            step.printed,
            actual
        );
        for (expected, actual) in step.printed.iter().zip(&actual) {
            assert!(
                shows(expected, actual),
                "`{}`: the README shows\n  {expected}\nbut it printed\n  {actual}",
                step.command
            );
        }
        compared += 1;
    }
    assert_eq!(compared, printed.len(), "every command this test runs is in the README");
}

#[test]
fn the_matcher_takes_hex_for_ellipses_and_any_time_for_a_time() {
    assert!(shows("fingerprint 5f0c…e1a9", "fingerprint 0b62c8200799e0fd2e8d742cd8f5"));
    assert!(!shows("fingerprint 5f0c…e1a9", "fingerprint"));
    assert!(!shows("fingerprint 5f0c…e1a9", "fingerprint xyz"));
    assert!(shows("?fp=…&token=…", "?fp=ab12&token=99"));
    assert!(shows("1  2026-12-03 07:41  never", "1  2027-01-31 23:59  never"));
    assert!(shows("2026-12-03T07:41:07.950368Z  INFO", "2026-12-04T00:00:00.1Z  INFO"));
    assert!(!shows("vip 10.77.0.2", "vip 10.77.0.3"));
}
