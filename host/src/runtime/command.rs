//! Plain WASI preview-1 command modules (no SDK): the payload is stdin, the
//! result is stdout, exit code 0 is success.

use super::guest::{GuestContext, HasGuest};
use wasmtime::{Engine, Linker, Store};
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

/// A fresh store for one command run, with the payload on stdin.
pub(super) fn store(engine: &Engine, guest: GuestContext, payload: Vec<u8>) -> Store<CommandState> {
    let wasi = guest
        .sandbox()
        .stdin(MemoryInputPipe::new(payload))
        .build_p1();
    Store::new(engine, CommandState { wasi, guest })
}
