//! Tag templates: a tag with `{param}` placeholders, filled from the matched route's path
//! parameters.

use std::collections::HashSet;

use crate::error::ConfigError;
use crate::tags::{is_user_tag, MAX_TAG_LEN};

/// A tag with `{param}` placeholders, filled from the matched route's path parameters.
#[derive(Clone, Debug)]
pub(crate) struct TagTemplate {
    parts: Vec<TagPart>,
}

#[derive(Clone, Debug)]
enum TagPart {
    Literal(String),
    Param(String),
}

impl TagTemplate {
    pub(super) fn parse(
        template: &str,
        params: &HashSet<String>,
        pattern: &str,
    ) -> Result<Self, ConfigError> {
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            let close = rest[open..].find('}').map(|c| open + c).ok_or_else(|| {
                ConfigError::new(format!("tag `{template}` has an unclosed `{{`"))
            })?;
            if open > 0 {
                parts.push(TagPart::Literal(rest[..open].to_owned()));
            }
            let name = &rest[open + 1..close];
            if !params.contains(name) {
                return Err(ConfigError::new(format!(
                    "tag `{template}` names `{{{name}}}`, which route `{pattern}` does not have; \
                     use one of its path parameters"
                )));
            }
            parts.push(TagPart::Param(name.to_owned()));
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(TagPart::Literal(rest.to_owned()));
        }
        // The template's shape with every parameter as one letter must itself be a tag a
        // user may give: the same rule as hints, headers and handle calls.
        let shape: String = parts
            .iter()
            .map(|p| match p {
                TagPart::Literal(l) => l.as_str(),
                TagPart::Param(_) => "p",
            })
            .collect();
        if !is_user_tag(&shape) || template.len() > MAX_TAG_LEN || shape.contains('}') {
            return Err(ConfigError::new(format!(
                "tag `{template}` is not valid: tags are 1 to {MAX_TAG_LEN} bytes of visible ASCII, not starting with `~`"
            )));
        }
        Ok(TagTemplate { parts })
    }

    pub(super) fn render(&self, params: &matchit::Params<'_, '_>) -> Option<String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                TagPart::Literal(l) => out.push_str(l),
                TagPart::Param(name) => {
                    out.push_str(&crate::percent::decode_for_tags(params.get(name)?));
                }
            }
        }
        is_user_tag(&out).then_some(out)
    }
}
