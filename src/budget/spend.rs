//! The spend cap: reserve before each attempt, settle with real usage afterwards.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::HeaderName;

use super::estimate::TokenEstimate;
use super::store::{BudgetStore, Lease, MICROS_PER_UNIT, Refusal, SpendStatus, StoreFuture};
use crate::attempt_log::{Attempt, AttemptLog, StreamEnd, Usage};
use crate::classify::FailureClass;
use crate::context::{AttemptAdmission, RouteName, SpendDenied, SpendGate};
use crate::error::{Error, ErrorKind};
use crate::policy::{ChargeRule, PolicyError, Price, SpendPolicy};

/// The budget owner of a request, as a request extension; it takes precedence over the
/// policy's `owner_header`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct BudgetOwner(Arc<str>);

impl BudgetOwner {
    /// An owner.
    pub fn new(name: impl AsRef<str>) -> Self {
        Self(Arc::from(name.as_ref()))
    }

    /// The owner's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for BudgetOwner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for BudgetOwner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A price in micro cost units per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MicroPrice {
    input: u64,
    output: u64,
}

impl MicroPrice {
    const ZERO: MicroPrice = MicroPrice {
        input: 0,
        output: 0,
    };

    fn of(p: &Price) -> Self {
        Self {
            input: to_micros(p.input_per_mtok),
            output: to_micros(p.output_per_mtok),
        }
    }

    /// Cost of a usage, rounded up to the next micro unit (never under-charged).
    pub(crate) fn cost(&self, input_tokens: u64, output_tokens: u64) -> u64 {
        let total = u128::from(input_tokens) * u128::from(self.input)
            + u128::from(output_tokens) * u128::from(self.output);
        u64::try_from(total.div_ceil(1_000_000)).unwrap_or(u64::MAX)
    }
}

/// Cost units to micro units, rounded to the nearest micro unit (values are validated finite
/// and non-negative; absurdly large ones saturate).
fn to_micros(units: f64) -> u64 {
    let m = (units * MICROS_PER_UNIT as f64).round();
    if m >= u64::MAX as f64 {
        u64::MAX
    } else {
        m.max(0.0) as u64
    }
}

/// Micro units to cost units, for display.
pub(crate) fn to_units(micros: u64) -> f64 {
    micros as f64 / MICROS_PER_UNIT as f64
}

/// A request's reservations live this long unless settled, when no deadline says otherwise.
pub(crate) const DEFAULT_LEASE: Duration = Duration::from_secs(3600);

/// The spend section, checked and converted to integers.
pub(crate) struct SpendConfig {
    cap: u64,
    window: Duration,
    /// How long a request's reservations live in the store unless settled.
    pub(crate) lease_ttl: Duration,
    owner_header: HeaderName,
    default_owner: Option<String>,
    prices: HashMap<String, MicroPrice>,
    default_price: Option<MicroPrice>,
    charge: ChargeRule,
    hard: bool,
    /// Bookings above their reservation.
    overruns: std::sync::atomic::AtomicU64,
}

impl fmt::Debug for SpendConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpendConfig")
            .field("cap", &self.cap)
            .field("window", &self.window)
            .field("owner_header", &self.owner_header)
            .field("charge", &self.charge)
            .finish_non_exhaustive()
    }
}

impl SpendConfig {
    pub(crate) fn new(p: &SpendPolicy, lease_ttl: Duration) -> Result<Self, PolicyError> {
        let owner_header = HeaderName::from_bytes(p.owner_header.as_bytes()).map_err(|_| {
            PolicyError::new("budget.spend.owner_header", "is not a valid header name")
        })?;
        if let Some(o) = &p.default_owner {
            if o.trim().is_empty() {
                return Err(PolicyError::new(
                    "budget.spend.default_owner",
                    "must not be empty",
                ));
            }
        }
        Ok(Self {
            cap: to_micros(p.cap),
            window: p.window,
            lease_ttl,
            owner_header,
            default_owner: p.default_owner.clone(),
            prices: p
                .prices
                .iter()
                .map(|(r, p)| (r.clone(), MicroPrice::of(p)))
                .collect(),
            default_price: p.default_price.as_ref().map(MicroPrice::of),
            charge: p.charge_failed,
            hard: p.hard,
            overruns: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// What one attempt at `price` reserves: the estimate, or under a hard cap the most the
    /// attempt can be billed.
    fn reservation(&self, price: MicroPrice, e: &TokenEstimate) -> u64 {
        let input = if self.hard {
            e.input_bound
        } else {
            e.input_tokens
        };
        price.cost(input, e.max_output_tokens)
    }

    pub(crate) fn price(&self, route: &str) -> Option<MicroPrice> {
        self.prices.get(route).copied().or(self.default_price)
    }

    /// The owner named by the request: its [`BudgetOwner`] extension, else the owner header,
    /// else the policy's default owner.
    pub(crate) fn owner_of<B>(&self, req: &http::Request<B>) -> Option<String> {
        if let Some(o) = req.extensions().get::<BudgetOwner>() {
            return Some(o.as_str().to_owned());
        }
        let from_header = req
            .headers()
            .get(&self.owner_header)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty());
        match from_header {
            Some(h) => Some(h.to_owned()),
            None => self.default_owner.clone(),
        }
    }

    /// Asks the store to reserve the estimated maximum cost of the first attempt — `estimate`
    /// at `route`'s price — for `owner`, atomically; fails closed when the request names no
    /// owner or the route has no price.
    pub(crate) fn open(
        self: &Arc<Self>,
        store: &Arc<dyn BudgetStore>,
        owner: Option<String>,
        route: &RouteName,
        estimate: TokenEstimate,
        log: &AttemptLog,
    ) -> Result<Opening, Error> {
        let Some(owner) = owner else {
            return Err(Error::new(ErrorKind::BudgetExhausted { owner: None })
                .with_source("the request names no budget owner"));
        };
        // The exported record names whom the request was (or would have been) charged to.
        log.set_budget_owner(owner.as_str());
        let Some(price) = self.price(route.as_str()) else {
            return Err(Error::new(ErrorKind::BudgetExhausted {
                owner: Some(owner.clone()),
            })
            .with_source(format!("route `{route}` has no price")));
        };
        let reserved = self.reservation(price, &estimate);
        let lease = Lease::new(crate::store::unique_id(), self.lease_ttl);
        let reserve = store.reserve(&owner, lease, reserved, self.cap, self.window);
        Ok(Opening {
            reserve,
            ticket: Some(Ticket {
                cfg: self.clone(),
                store: store.clone(),
                owner,
                lease,
                estimate,
                first_price: price,
                route: route.clone(),
                log: log.clone(),
                state: Mutex::new(TicketState {
                    reservations: vec![(route.clone(), reserved)],
                    ..TicketState::default()
                }),
            }),
        })
    }
}

/// A first reservation the store is still deciding. The ticket is handed out once it is
/// granted, so that nothing is settled for a reservation that was never made; dropped before
/// the answer (the request was cancelled), the opening settles once the answer is known.
pub(crate) struct Opening {
    reserve: StoreFuture<Result<(), Refusal>>,
    ticket: Option<Ticket>,
}

impl fmt::Debug for Opening {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opening").finish_non_exhaustive()
    }
}

impl Opening {
    /// The ticket once the reservation is granted; the error to fail the request with when it
    /// is not.
    pub(crate) fn poll_open(&mut self, cx: &mut Context<'_>) -> Poll<Result<Arc<Ticket>, Error>> {
        let granted = ready!(Pin::new(&mut self.reserve).poll(cx));
        Poll::Ready(self.granted(granted))
    }

    fn granted(&mut self, granted: Result<(), Refusal>) -> Result<Arc<Ticket>, Error> {
        let Some(ticket) = self.ticket.take() else {
            return Err(Error::new(ErrorKind::BudgetExhausted { owner: None })
                .with_source("the reservation was already decided"));
        };
        let reserved = ticket.lock().reserved();
        let owner = ticket.owner.clone();
        let cap = ticket.cfg.cap;
        match granted {
            Ok(()) => Ok(Arc::new(ticket)),
            Err(Refusal::Spend(status)) => {
                ticket.forget();
                Err(
                    Error::new(ErrorKind::BudgetExhausted { owner: Some(owner) }).with_source(
                        format!(
                            "reserving {} would exceed the cap of {} ({} spent, {} reserved)",
                            to_units(reserved),
                            to_units(cap),
                            to_units(status.spent),
                            to_units(status.reserved)
                        ),
                    ),
                )
            }
            Err(refusal) => {
                ticket.forget();
                Err(unavailable(refusal))
            }
        }
    }
}

impl Drop for Opening {
    fn drop(&mut self) {
        let Some(ticket) = self.ticket.take() else {
            return;
        };
        // Settle what the store decides, once it has: settling before a reservation that is
        // still on its way would leave it open (or, in a store that counts amounts, take it off
        // another request's).
        let mut reserve = std::mem::replace(&mut self.reserve, StoreFuture::ready(Ok(())));
        let settle = |granted: Result<(), Refusal>, ticket: Ticket| match granted {
            // Cancelled before its call: settles charging nothing, as a dropped ticket does.
            Ok(()) => drop(ticket),
            Err(_) => ticket.forget(),
        };
        if let Some(granted) = reserve.now() {
            return settle(granted, ticket);
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move { settle(reserve.await, ticket) });
            }
            // No runtime to wait on: settle now, by its lease.
            Err(_) => drop(ticket),
        }
    }
}

/// The error of a store that could not be asked.
pub(crate) fn unavailable(refusal: Refusal) -> Error {
    let reason = match refusal {
        Refusal::Unavailable(reason) => reason,
        other => format!("{other:?}"),
    };
    Error::new(ErrorKind::StoreUnavailable).with_source(reason)
}

/// How a reserved request ended.
#[derive(Debug)]
pub(crate) enum End {
    /// A response came; its body ended (`complete`) or stopped early (error or drop).
    Response {
        success: bool,
        complete: bool,
        usage: Option<Usage>,
        route: Option<RouteName>,
    },
    /// A crate error; `in_flight` when an attempt was cut off before it was recorded
    /// (deadline, cancellation).
    Error { in_flight: bool },
}

#[derive(Debug, Default)]
struct TicketState {
    called: bool,
    reported: Option<Usage>,
    /// Every reservation held for the request, in the order its attempts were admitted: the
    /// first attempt's at admission, then one per retry or hop its inner layers made.
    reservations: Vec<(RouteName, u64)>,
    settled: Option<Settled>,
}

impl TicketState {
    fn reserved(&self) -> u64 {
        self.reservations
            .iter()
            .map(|(_, a)| *a)
            .fold(0, u64::saturating_add)
    }
}

#[derive(Debug, Clone, Copy)]
struct Settled {
    total: u64,
    answer: u64,
    answer_price: MicroPrice,
}

impl Settled {
    /// A ticket whose reservation was refused: there is nothing to settle.
    const NOTHING: Settled = Settled {
        total: 0,
        answer: 0,
        answer_price: MicroPrice::ZERO,
    };
}

/// One logical request's reservations. Settles exactly once: at the end of the response body,
/// on an error, or — as a backstop — when the last handle to it is dropped.
pub(crate) struct Ticket {
    cfg: Arc<SpendConfig>,
    store: Arc<dyn BudgetStore>,
    owner: String,
    lease: Lease,
    estimate: TokenEstimate,
    /// The price of the first attempt's route: the price of attempts on unpriced routes.
    first_price: MicroPrice,
    route: RouteName,
    log: AttemptLog,
    state: Mutex<TicketState>,
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("owner", &self.owner)
            .field("reserved", &self.lock().reserved())
            .finish_non_exhaustive()
    }
}

impl Ticket {
    /// Drops the ticket of a reservation the store refused: nothing to settle.
    fn forget(self) {
        self.lock().settled = Some(Settled::NOTHING);
    }

    fn lock(&self) -> MutexGuard<'_, TicketState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The request was handed to the inner service: from now on it may have been accepted.
    pub(crate) fn mark_called(&self) {
        self.lock().called = true;
    }

    /// The gate the inner layers ask before every further attempt. It does not keep the
    /// ticket alive: once the request has settled, every further attempt is denied.
    pub(crate) fn gate(self: &Arc<Self>) -> SpendGate {
        SpendGate::new(TicketGate {
            ticket: Arc::downgrade(self),
            owner: self.owner.clone(),
        })
    }

    /// Reserves one more attempt on `route`, atomically in the store.
    fn admit(self: &Arc<Self>, route: &RouteName) -> StoreFuture<Result<(), SpendDenied>> {
        let denied = || SpendDenied::new(self.owner.as_str());
        if self.lock().settled.is_some() {
            return StoreFuture::ready(Err(denied()));
        }
        // A route without a price fails closed, as it does at admission.
        let Some(price) = self.cfg.price(route.as_str()) else {
            return StoreFuture::ready(Err(denied()));
        };
        let amount = self.cfg.reservation(price, &self.estimate);
        let mut reserve = self.store.reserve(
            &self.owner,
            self.lease,
            amount,
            self.cfg.cap,
            self.cfg.window,
        );
        if let Some(granted) = reserve.now() {
            return StoreFuture::ready(self.admitted(route, amount, granted));
        }
        let (ticket, route) = (self.clone(), route.clone());
        StoreFuture::new(async move {
            let granted = reserve.await;
            ticket.admitted(&route, amount, granted)
        })
    }

    fn admitted(
        &self,
        route: &RouteName,
        amount: u64,
        granted: Result<(), Refusal>,
    ) -> Result<(), SpendDenied> {
        let mut st = self.lock();
        match granted {
            Ok(()) if st.settled.is_none() => {
                st.reservations.push((route.clone(), amount));
                Ok(())
            }
            // Settled while the store decided: nothing would close this reservation.
            Ok(()) => {
                drop(st);
                self.store
                    .release(&self.owner, self.lease, amount, self.cfg.window);
                Err(SpendDenied::new(self.owner.as_str()))
            }
            Err(refusal) => {
                tracing::debug!(
                    target: "tower_llm_resilience::budget",
                    owner = %self.owner,
                    route = %route,
                    reservation = to_units(amount),
                    refusal = ?refusal,
                    "spend cap denied a further attempt"
                );
                Err(SpendDenied::new(self.owner.as_str()))
            }
        }
    }

    /// Gives back the latest reservation on `route` (its attempt was not made).
    fn release(&self, route: &RouteName) {
        let mut st = self.lock();
        if st.settled.is_some() {
            return;
        }
        if let Some(i) = st.reservations.iter().rposition(|(r, _)| r == route) {
            let (_, amount) = st.reservations.remove(i);
            self.store
                .release(&self.owner, self.lease, amount, self.cfg.window);
        }
    }

    fn rule(&self, possibly_accepted: bool, reservation: u64) -> u64 {
        match self.cfg.charge {
            ChargeRule::ReportedOnly => 0,
            ChargeRule::Reserved => reservation,
            ChargeRule::ReportedOrReserved if possibly_accepted => reservation,
            _ => 0,
        }
    }

    fn price_of(&self, route: Option<&RouteName>) -> MicroPrice {
        route
            .and_then(|r| self.cfg.price(r.as_str()))
            .unwrap_or(self.first_price)
    }

    /// The reservation of one attempt on `route`: the estimate at its price.
    fn reservation_at(&self, route: Option<&RouteName>) -> u64 {
        self.cfg.reservation(self.price_of(route), &self.estimate)
    }

    /// What a failed attempt costs: its reported usage, else what the charge rule says.
    fn failed_attempt(&self, a: &Attempt) -> u64 {
        if let Some(u) = a.stream.as_ref().and_then(|s| s.usage) {
            return self
                .price_of(a.route.as_ref())
                .cost(u.input_tokens, u.output_tokens);
        }
        let stream_broke = a
            .stream
            .as_ref()
            .is_some_and(|s| s.end != StreamEnd::Complete);
        let possibly_accepted = stream_broke
            || matches!(
                a.class,
                None | Some(
                    FailureClass::Timeout
                        | FailureClass::Transport
                        | FailureClass::StreamInterrupted
                )
            );
        self.rule(possibly_accepted, self.reservation_at(a.route.as_ref()))
    }

    /// Settles every reservation of the request (once; later calls do nothing): books what
    /// its attempts cost and releases the rest.
    pub(crate) fn settle(&self, end: End) {
        let mut st = self.lock();
        if st.settled.is_some() {
            return;
        }
        let attempts = self.log.attempts();
        let answer_index = match end {
            End::Response { .. } => attempts.len().checked_sub(1),
            End::Error { .. } => None,
        };
        let mut total: u64 = attempts
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != answer_index)
            .map(|(_, a)| self.failed_attempt(a))
            .fold(0, u64::saturating_add);
        let mut answer = 0;
        let mut answer_price = self.first_price;
        let mut booked_usage = None;
        match end {
            End::Response {
                success,
                complete,
                usage,
                route,
            } => {
                let answer_attempt = answer_index.and_then(|i| attempts.get(i));
                let route = answer_attempt
                    .and_then(|a| a.route.clone())
                    .or(route)
                    .unwrap_or_else(|| self.route.clone());
                answer_price = self.price_of(Some(&route));
                let reservation = self.reservation_at(Some(&route));
                let usage = st
                    .reported
                    .or_else(|| answer_attempt.and_then(|a| a.stream.as_ref()?.usage))
                    .or(usage);
                booked_usage = usage;
                answer = match usage {
                    Some(u) => {
                        let booked = answer_price.cost(u.input_tokens, u.output_tokens);
                        if booked > reservation {
                            self.cfg
                                .overruns
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tracing::warn!(
                                target: "tower_llm_resilience::budget",
                                owner = %self.owner,
                                route = %route,
                                reserved = to_units(reservation),
                                booked = to_units(booked),
                                "a booking above its reservation: the cap may be exceeded"
                            );
                        }
                        booked
                    }
                    // A success whose usage is unknown cost something: keep its reservation.
                    None if success && complete => reservation,
                    None => self.rule(success, reservation),
                };
            }
            End::Error { in_flight } => {
                if in_flight && st.called {
                    // The attempt cut off is the one admitted last.
                    let reservation = match st.reservations.last() {
                        Some((_, a)) => *a,
                        None => self.reservation_at(None),
                    };
                    total = total.saturating_add(self.rule(true, reservation));
                }
            }
        }
        total = total.saturating_add(answer);
        let reserved = st.reserved();
        self.store
            .settle(&self.owner, self.lease, reserved, total, self.cfg.window);
        self.log.set_charge(total, booked_usage);
        tracing::debug!(
            target: "tower_llm_resilience::budget",
            owner = %self.owner,
            reserved = to_units(reserved),
            attempts_admitted = st.reservations.len(),
            charged = to_units(total),
            "spend settled"
        );
        st.settled = Some(Settled {
            total,
            answer,
            answer_price,
        });
    }

    fn report(&self, usage: Usage) {
        let mut st = self.lock();
        match st.settled.as_mut() {
            None => st.reported = Some(usage),
            Some(s) => {
                let new = s.answer_price.cost(usage.input_tokens, usage.output_tokens);
                self.store
                    .adjust(&self.owner, s.answer, new, self.cfg.window);
                s.total = s.total.saturating_sub(s.answer).saturating_add(new);
                s.answer = new;
                let total = s.total;
                st.reported = Some(usage);
                self.log.set_charge(total, Some(usage));
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // Nothing settled it: the request was cancelled before an answer.
        self.settle(End::Error { in_flight: true });
    }
}

/// The [`SpendGate`] of one request: admits further attempts against its ticket.
struct TicketGate {
    ticket: Weak<Ticket>,
    owner: String,
}

impl AttemptAdmission for TicketGate {
    fn admit(&self, route: &RouteName) -> StoreFuture<Result<(), SpendDenied>> {
        match self.ticket.upgrade() {
            Some(t) => t.admit(route),
            // The request has settled: nothing would release a new reservation.
            None => StoreFuture::ready(Err(SpendDenied::new(self.owner.as_str()))),
        }
    }

    fn release(&self, route: &RouteName) {
        if let Some(t) = self.ticket.upgrade() {
            t.release(route);
        }
    }
}

/// The spend record of one request, in its response's extensions.
///
/// The reservation settles by itself when the response body ends or is dropped, with the usage
/// the provider reported (JSON `usage` within the peek bound, or the final stream event recorded
/// by the stream guard). When the application knows the real usage better — it parsed the
/// stream itself — it reports it here, before or after settlement.
#[derive(Clone)]
pub struct SpendReceipt(pub(crate) Arc<Ticket>);

impl SpendReceipt {
    /// The budget owner charged.
    pub fn owner(&self) -> &str {
        &self.0.owner
    }

    /// The amount reserved for the request's attempts, in micro cost units: the first
    /// attempt's reservation plus one per retry or hop admitted (less those given back).
    pub fn reserved_micros(&self) -> u64 {
        self.0.lock().reserved()
    }

    /// The amount charged, in micro cost units, once settled.
    pub fn charged_micros(&self) -> Option<u64> {
        self.0.lock().settled.map(|s| s.total)
    }

    /// Reports the real usage of the answer; it replaces what the body said (or the kept
    /// reservation) and corrects the booked spend if the request has already settled.
    pub fn report(&self, usage: Usage) {
        self.0.report(usage);
    }
}

impl fmt::Debug for SpendReceipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpendReceipt")
            .field("owner", &self.0.owner)
            .field("reserved", &self.reserved_micros())
            .field("charged", &self.charged_micros())
            .finish()
    }
}

/// A handle on the spend cap of a [`BudgetLayer`](super::BudgetLayer): read an owner's spend
/// and book usage that happened outside a request the layer saw.
#[derive(Clone)]
pub struct SpendHandle {
    pub(crate) cfg: Arc<SpendConfig>,
    pub(crate) store: Arc<dyn BudgetStore>,
}

impl SpendHandle {
    /// Books `usage` on `route` to `owner`; returns its cost in micro cost units, or `None`
    /// when the route has no price (nothing is booked then).
    pub fn report(&self, owner: &str, route: &str, usage: Usage) -> Option<u64> {
        let cost = self
            .cfg
            .price(route)?
            .cost(usage.input_tokens, usage.output_tokens);
        self.store.adjust(owner, 0, cost, self.cfg.window);
        Some(cost)
    }

    /// The owner's spend in the current window; `Err` with the reason when the store cannot
    /// be asked.
    pub async fn status(&self, owner: &str) -> Result<SpendStatus, Refusal> {
        self.store.status(owner, self.cfg.window).await
    }

    /// What the owner may still reserve in the current window, in micro cost units.
    pub async fn remaining_micros(&self, owner: &str) -> Result<u64, Refusal> {
        let status = self.status(owner).await?;
        Ok(self.cfg.cap.saturating_sub(status.committed()))
    }

    /// The cap per owner and window, in micro cost units.
    pub fn cap_micros(&self) -> u64 {
        self.cfg.cap
    }

    /// Answers booked above their reservation so far: with a cap that is not `hard`, each
    /// one could take the owner past the cap.
    pub fn overruns(&self) -> u64 {
        self.cfg.overruns.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl fmt::Debug for SpendHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpendHandle")
            .field("cap", &self.cfg.cap)
            .field("window", &self.cfg.window)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_are_exact_integers_rounded_up() {
        let p = MicroPrice::of(&Price::new(2.5, 10.0));
        assert_eq!(p.cost(1_000_000, 0), 2_500_000);
        assert_eq!(p.cost(100, 100), 250 + 1000);
        assert_eq!(p.cost(1, 0), 3);
        assert_eq!(p.cost(0, 0), 0);
        assert_eq!(p.cost(u64::MAX, u64::MAX), u64::MAX);
        assert_eq!(to_micros(0.2002), 200_200);
        assert_eq!(to_micros(f64::MAX), u64::MAX);
    }
}
