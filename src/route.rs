//! The name of a route.

use std::fmt;
use std::sync::Arc;

/// The name of a route: the primary or a backup of the fallback chain.
///
/// `FallbackLayer` sets the route of the current attempt in the [`RequestContext`](crate::context::RequestContext), so that
/// the breaker keys its state by it and the stream guard picks its settings; it also puts the
/// route that served the answer into the response extensions.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteName(Arc<str>);

impl RouteName {
    /// A route name.
    pub fn new(name: impl AsRef<str>) -> Self {
        Self(Arc::from(name.as_ref()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The route named by the URI's authority of `req`, else `"default"`.
    pub(crate) fn of_authority<B>(req: &http::Request<B>) -> Self {
        match req.uri().authority() {
            Some(a) => Self::new(a.as_str()),
            None => Self::new("default"),
        }
    }
}

impl fmt::Debug for RouteName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for RouteName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for RouteName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl From<&str> for RouteName {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}
