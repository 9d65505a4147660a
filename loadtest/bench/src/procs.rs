//! Child processes (redis-server, nodes, workers, the floor): every one is
//! registered, dies with the orchestrator (PR_SET_PDEATHSIG), and is killed
//! on Ctrl-C, on failure and at the end of each scenario.

use std::path::Path;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

pub struct Proc {
    pub name: String,
    pub pid: u32,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Option<Lines<BufReader<ChildStdout>>>,
}

/// Spawns `program args`; `log` receives stdout+stderr, otherwise stdin and
/// stdout are pipes for line commands (stderr goes to `<dir>/<name>.err`).
pub fn spawn(name: &str, program: &Path, args: &[String], dir: &Path, piped: bool) -> Result<Proc> {
    let mut cmd = Command::new(program);
    cmd.args(args).kill_on_drop(true);
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    if piped {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(log);
    } else {
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
    }
    #[allow(unsafe_code)]
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawning {}", program.display()))?;
    let pid = child.id().ok_or_else(|| anyhow!("{name} exited at once"))?;
    CHILDREN.lock().unwrap().push(pid);
    let stdin = child.stdin.take();
    let lines = child.stdout.take().map(|o| BufReader::new(o).lines());
    Ok(Proc {
        name: name.to_owned(),
        pid,
        child,
        stdin,
        lines,
    })
}

impl Proc {
    pub async fn send(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().ok_or_else(|| anyhow!("no stdin"))?;
        stdin.write_all(format!("{line}\n").as_bytes()).await?;
        stdin.flush().await?;
        Ok(())
    }

    pub async fn recv(&mut self, patience: Duration) -> Result<String> {
        let lines = self.lines.as_mut().ok_or_else(|| anyhow!("no stdout"))?;
        match tokio::time::timeout(patience, lines.next_line()).await {
            Ok(Ok(Some(l))) => Ok(l),
            Ok(Ok(None)) => Err(anyhow!("{} exited (see its .log)", self.name)),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(anyhow!("{} did not answer within {patience:?}", self.name)),
        }
    }

    pub async fn ask(&mut self, line: &str, patience: Duration) -> Result<String> {
        self.send(line).await?;
        self.recv(patience).await
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        CHILDREN.lock().unwrap().retain(|p| *p != self.pid);
    }
}

/// SIGKILLs every child still registered.
pub fn kill_all() {
    for pid in CHILDREN.lock().unwrap().drain(..) {
        #[allow(unsafe_code)]
        // SAFETY: kill(2) on a pid we spawned and have not reaped.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
}
