//! Plain WASI preview-1 command modules (no SDK): the payload is stdin (a
//! fan-in task's: its job's results as NDJSON), the result is stdout, exit
//! code 0 is success.

use super::guest::{GuestContext, HasGuest};
use wasmtime::{Engine, Linker, Store};
use wasmtime_wasi::cli::AsyncStdinStream;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;

/// Store data of a command instance.
pub(super) struct CommandState {
    wasi: WasiP1Ctx,
    guest: GuestContext,
}

impl HasGuest for CommandState {
    fn guest(&self) -> &GuestContext {
        &self.guest
    }
    fn guest_mut(&mut self) -> &mut GuestContext {
        &mut self.guest
    }
}

/// The linker every command module is instantiated with: WASI preview 1 only.
pub(super) fn linker(engine: &Engine) -> wasmtime::Result<Linker<CommandState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_async(&mut linker, |state: &mut CommandState| {
        &mut state.wasi
    })?;
    Ok(linker)
}

/// What a command reads on stdin.
pub(super) enum Stdin {
    /// The task's payload.
    Payload(Vec<u8>),
    /// A fan-in task's input, written into a pipe as the command reads it
    /// (see `inputs::ndjson_stdin`).
    Pipe(tokio::io::DuplexStream),
}

/// A fresh store for one command run, with its stdin.
pub(super) fn store(engine: &Engine, guest: GuestContext, stdin: Stdin) -> Store<CommandState> {
    let mut wasi = guest.sandbox();
    match stdin {
        Stdin::Payload(payload) => wasi.stdin(MemoryInputPipe::new(payload)),
        Stdin::Pipe(pipe) => wasi.stdin(AsyncStdinStream::new(pipe)),
    };
    let wasi = wasi.build_p1();
    Store::new(engine, CommandState { wasi, guest })
}
