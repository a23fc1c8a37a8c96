//! Components built on `wit/kwq-task.wit`: generated bindings, the host side
//! of `kwq:task/context`, and instantiation.

use super::guest::{GuestContext, HasGuest};
use crate::model::LogLevel;
use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::http_refused::RefuseOutgoing;

#[allow(missing_docs, unreachable_pub, clippy::all)]
mod bindings {
    wasmtime::component::bindgen!({
        world: "kwq-task",
        path: "../wit",
        exports: { default: async },
    });
}

use bindings::kwq::task::context::{Host as ContextHost, Level};
pub(super) use bindings::{KwqTask, KwqTaskPre};

/// Store data of a component instance.
pub(super) struct ComponentState {
    wasi: WasiCtx,
    table: ResourceTable,
    http: WasiHttpCtx,
    refuse_outgoing: RefuseOutgoing,
    guest: GuestContext,
}

impl ComponentState {
    pub(super) fn new(guest: GuestContext) -> Self {
        let wasi = guest.sandbox().build();
        ComponentState {
            wasi,
            table: ResourceTable::new(),
            http: WasiHttpCtx::new(),
            refuse_outgoing: RefuseOutgoing,
            guest,
        }
    }
}

impl HasGuest for ComponentState {
    fn guest(&self) -> &GuestContext {
        &self.guest
    }
    fn guest_mut(&mut self) -> &mut GuestContext {
        &mut self.guest
    }
}

impl WasiView for ComponentState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for ComponentState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.refuse_outgoing,
        }
    }
}

impl ContextHost for ComponentState {
    fn log(&mut self, level: Level, message: String) {
        let level = match level {
            Level::Trace => LogLevel::Trace,
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        };
        self.guest.log(level, message);
    }

    fn progress(&mut self, fraction: f32) {
        self.guest.set_progress(fraction);
    }

    fn task_id(&mut self) -> String {
        self.guest.task_id.clone()
    }

    fn attempt(&mut self) -> u32 {
        self.guest.attempt
    }
}

/// The linker every component is instantiated with: WASI preview 2 (its
/// sandbox is set per store), `wasi:http` that refuses every request (see
/// `http_refused`), plus `kwq:task/context`.
pub(super) fn linker(engine: &Engine) -> wasmtime::Result<Linker<ComponentState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    KwqTask::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
    Ok(linker)
}

/// A fresh store for a component instance.
pub(super) fn store(engine: &Engine, guest: GuestContext) -> Store<ComponentState> {
    Store::new(engine, ComponentState::new(guest))
}
