//! Where things are in a scenario file. Checks name a place by its path
//! (`steps[3].fault.link`); the [`SourceMap`] turns that into line and
//! column, so every error a scenario gets says file:line:col.

use std::collections::HashMap;
use std::fmt;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// A path into the YAML document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct YamlPath(pub Vec<Seg>);

impl YamlPath {
    pub fn key(k: &str) -> Self {
        YamlPath(vec![Seg::Key(k.to_string())])
    }

    pub fn index(i: usize) -> Self {
        YamlPath(vec![Seg::Index(i)])
    }

    pub fn then_key(mut self, k: &str) -> Self {
        self.0.push(Seg::Key(k.to_string()));
        self
    }

    pub fn then_index(mut self, i: usize) -> Self {
        self.0.push(Seg::Index(i));
        self
    }

    /// `self` followed by `rest`.
    pub fn join(mut self, rest: &YamlPath) -> Self {
        self.0.extend(rest.0.iter().cloned());
        self
    }
}

impl fmt::Display for YamlPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            match s {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// Something wrong at a place in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub at: YamlPath,
    pub message: String,
}

impl Problem {
    pub fn at(at: YamlPath, message: impl Into<String>) -> Self {
        Problem { at, message: message.into() }
    }

    /// A problem with the thing being checked itself.
    pub fn here(message: impl Into<String>) -> Self {
        Problem { at: YamlPath::default(), message: message.into() }
    }

    /// The same problem, seen from `prefix` (an entry's place in the file).
    pub fn under(self, prefix: &YamlPath) -> Self {
        Problem { at: prefix.clone().join(&self.at), message: self.message }
    }

    /// A serde error at `path` (from serde_path_to_error). An unknown or
    /// missing field is placed at the map it belongs to, or at the key
    /// itself when the key is there.
    pub fn from_serde(path: &serde_path_to_error::Path, message: &str) -> Self {
        use serde_path_to_error::Segment;
        let mut at = YamlPath::default();
        for seg in path.iter() {
            match seg {
                Segment::Seq { index } => at.0.push(Seg::Index(*index)),
                Segment::Map { key } => at.0.push(Seg::Key(key.clone())),
                Segment::Enum { variant } => at.0.push(Seg::Key(variant.clone())),
                Segment::Unknown => {}
            }
        }
        if let Some(field) = message.strip_prefix("unknown field `").and_then(|m| m.split('`').next()) {
            at.0.push(Seg::Key(field.to_string()));
        }
        // yaml_serde appends its own (meaningless here) position to some messages.
        let message = message.split(" at line ").next().unwrap_or(message).to_string();
        Problem { at, message }
    }
}

/// Line and column (1-based) of every mapping key and sequence item.
#[derive(Debug, Default)]
pub struct SourceMap {
    places: HashMap<YamlPath, (usize, usize)>,
}

enum Frame {
    Map { path: YamlPath, key: Option<String>, expecting_key: bool },
    Seq { path: YamlPath, next: usize },
}

struct Recorder {
    stack: Vec<Frame>,
    places: HashMap<YamlPath, (usize, usize)>,
}

impl Recorder {
    fn here(m: &Marker) -> (usize, usize) {
        (m.line(), m.col() + 1)
    }

    /// The path of a node starting now, recording where it starts. For a
    /// mapping key, returns `None` (the key's place is recorded instead).
    fn node_path(&mut self, ev: &Event, mark: &Marker) -> Option<YamlPath> {
        match self.stack.last_mut() {
            None => Some(YamlPath::default()),
            Some(Frame::Seq { path, next }) => {
                let p = path.clone().then_index(*next);
                *next += 1;
                self.places.entry(p.clone()).or_insert(Self::here(mark));
                Some(p)
            }
            Some(Frame::Map { path, key, expecting_key }) => {
                if *expecting_key {
                    let k = match ev {
                        Event::Scalar(s, ..) => s.clone(),
                        _ => String::new(),
                    };
                    let here = Self::here(mark);
                    // A block mapping's start event is marked after its
                    // first key (at the `:`), so the mapping is placed at
                    // that key: an item `- fault: {…}` is where `fault` is.
                    if key.is_none() {
                        if let Some(at) = self.places.get_mut(path) {
                            *at = (*at).min(here);
                        }
                    }
                    let p = path.clone().then_key(&k);
                    self.places.entry(p).or_insert(here);
                    *key = Some(k);
                    *expecting_key = false;
                    None
                } else {
                    *expecting_key = true;
                    Some(path.clone().then_key(key.as_deref().unwrap_or_default()))
                }
            }
        }
    }
}

impl MarkedEventReceiver for Recorder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match &ev {
            Event::MappingStart(..) | Event::SequenceStart(..) | Event::Scalar(..) | Event::Alias(..) => {
                let Some(path) = self.node_path(&ev, &mark) else {
                    // A complex (non-scalar) key: keep its frame balanced.
                    if matches!(ev, Event::MappingStart(..)) {
                        self.stack.push(Frame::Map { path: YamlPath::key("?"), key: None, expecting_key: true });
                    } else if matches!(ev, Event::SequenceStart(..)) {
                        self.stack.push(Frame::Seq { path: YamlPath::key("?"), next: 0 });
                    }
                    return;
                };
                self.places.entry(path.clone()).or_insert(Self::here(&mark));
                match ev {
                    Event::MappingStart(..) => self.stack.push(Frame::Map { path, key: None, expecting_key: true }),
                    Event::SequenceStart(..) => self.stack.push(Frame::Seq { path, next: 0 }),
                    _ => {}
                }
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

impl SourceMap {
    /// Maps a document's places. A document the parser refuses maps nothing
    /// (serde reports that error with its own location first).
    pub fn of(text: &str) -> Self {
        let mut rec = Recorder { stack: Vec::new(), places: HashMap::new() };
        let mut parser = Parser::new_from_str(text);
        if parser.load(&mut rec, false).is_err() {
            return SourceMap::default();
        }
        SourceMap { places: rec.places }
    }

    /// The line and column of `path`, or of its nearest ancestor in the file.
    pub fn locate(&self, path: &YamlPath) -> (usize, usize) {
        let mut p = path.0.clone();
        loop {
            if let Some(lc) = self.places.get(&YamlPath(p.clone())) {
                return *lc;
            }
            if p.pop().is_none() {
                return (1, 1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_of_keys_and_items() {
        let y = "name: x\nsteps:\n  - wait: 1s\n  - fault: {link: p, kind: drop}\n";
        let m = SourceMap::of(y);
        assert_eq!(m.locate(&YamlPath::key("name")), (1, 1));
        assert_eq!(m.locate(&YamlPath::key("steps").then_index(1)), (4, 5));
        assert_eq!(m.locate(&YamlPath::key("steps").then_index(1).then_key("fault").then_key("kind")), (4, 22));
        // An absent key falls back to its parent.
        assert_eq!(m.locate(&YamlPath::key("steps").then_index(0).then_key("wait").then_key("nope")), (3, 5));
    }

    #[test]
    fn broken_yaml_maps_nothing_and_does_not_panic() {
        let m = SourceMap::of("a: [1, 2\n  b: {");
        assert_eq!(m.locate(&YamlPath::key("a")), (1, 1));
    }

    #[test]
    fn paths_display_as_written() {
        let p = YamlPath::key("steps").then_index(3).then_key("fault").then_key("link");
        assert_eq!(p.to_string(), "steps[3].fault.link");
    }
}
