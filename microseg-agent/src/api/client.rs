//! The CLI's side of the API.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{Context, bail};

use super::protocol::{Request, Response};

pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    pub fn connect(socket: &Path) -> anyhow::Result<Self> {
        let stream = UnixStream::connect(socket).with_context(|| {
            format!(
                "cannot reach the microseg agent at {} (is `microseg agent` running, and are you root?)",
                socket.display()
            )
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    fn send(&mut self, request: &Request) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        Ok(())
    }

    /// Sends a request and returns the agent's response; a refused request is an error
    /// carrying the agent's sentence and details.
    pub fn call(&mut self, request: &Request) -> anyhow::Result<serde_json::Value> {
        self.send(request)?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("the agent closed the connection without answering");
        }
        let response: Response = serde_json::from_str(&line)?;
        if response.ok {
            Ok(response.data)
        } else {
            let mut message = response
                .error
                .unwrap_or_else(|| "request failed".to_owned());
            for detail in response.details {
                message.push_str("\n  ");
                message.push_str(&detail);
            }
            bail!(message)
        }
    }

    /// Sends an `Events` request and calls `on_event` for each event line until the
    /// stream ends (or `on_event` returns false).
    pub fn stream(
        &mut self,
        request: &Request,
        mut on_event: impl FnMut(serde_json::Value) -> bool,
    ) -> anyhow::Result<()> {
        self.writer.set_read_timeout(None)?;
        self.reader.get_ref().set_read_timeout(None)?;
        self.send(request)?;
        let mut line = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let value: serde_json::Value = serde_json::from_str(&line)?;
            if value.get("ok") == Some(&serde_json::Value::Bool(false)) {
                bail!(
                    "{}",
                    value["error"]
                        .as_str()
                        .unwrap_or("the agent refused the request")
                );
            }
            if value.get("end_of_stream").is_some() {
                return Ok(());
            }
            if !on_event(value) {
                return Ok(());
            }
        }
    }
}
