//! Schemas: what Terraform is told about the provider's configuration,
//! resources and data sources, and the shape every value sent back must have.

use std::collections::BTreeMap;

use crate::pb;
use crate::value::Value;

/// A Terraform attribute type.
#[derive(Clone, Debug, PartialEq)]
pub enum Ty {
    /// `string`.
    String,
    /// `number`.
    Number,
    /// `bool`.
    Bool,
    /// `list(T)`.
    List(Box<Ty>),
    /// `map(T)`.
    Map(Box<Ty>),
    /// `object({...})`.
    Object(Vec<(&'static str, Ty)>),
}

impl Ty {
    /// Terraform's JSON notation for the type.
    pub fn json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Ty::String => json!("string"),
            Ty::Number => json!("number"),
            Ty::Bool => json!("bool"),
            Ty::List(t) => json!(["list", t.json()]),
            Ty::Map(t) => json!(["map", t.json()]),
            Ty::Object(fields) => {
                let m: serde_json::Map<String, serde_json::Value> = fields
                    .iter()
                    .map(|(n, t)| (n.to_string(), t.json()))
                    .collect();
                json!(["object", m])
            }
        }
    }
}

/// Who sets an attribute.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// The user, always.
    Required,
    /// The user, if they like.
    Optional,
    /// Set by the provider only.
    Computed,
    /// Set in configuration, or by the provider when left out.
    OptionalComputed,
}

/// One attribute of a schema.
#[derive(Clone, Debug)]
pub struct Attr {
    /// Its name.
    pub name: &'static str,
    /// Its type.
    pub ty: Ty,
    /// Who sets it.
    pub mode: Mode,
    /// Hidden in plans and logs.
    pub sensitive: bool,
    /// What it is, for docs.
    pub description: &'static str,
}

impl Attr {
    /// An attribute that is not sensitive.
    pub fn new(name: &'static str, ty: Ty, mode: Mode, description: &'static str) -> Self {
        Self {
            name,
            ty,
            mode,
            sensitive: false,
            description,
        }
    }

    /// The same attribute, sensitive.
    pub fn sensitive(mut self) -> Self {
        self.sensitive = true;
        self
    }
}

/// A resource's or data source's schema.
#[derive(Clone, Debug)]
pub struct Block {
    /// What it is, for docs.
    pub description: &'static str,
    /// Its attributes.
    pub attrs: Vec<Attr>,
}

impl Block {
    /// As the plugin protocol sends it.
    pub fn to_proto(&self) -> pb::Schema {
        pb::Schema {
            version: 0,
            block: Some(pb::schema::Block {
                version: 0,
                description: self.description.into(),
                description_kind: pb::StringKind::Markdown as i32,
                attributes: self
                    .attrs
                    .iter()
                    .map(|a| pb::schema::Attribute {
                        name: a.name.into(),
                        r#type: a.ty.json().to_string().into_bytes(),
                        description: a.description.into(),
                        description_kind: pb::StringKind::Markdown as i32,
                        required: a.mode == Mode::Required,
                        optional: matches!(a.mode, Mode::Optional | Mode::OptionalComputed),
                        computed: matches!(a.mode, Mode::Computed | Mode::OptionalComputed),
                        sensitive: a.sensitive,
                        deprecated: false,
                    })
                    .collect(),
                block_types: Vec::new(),
                deprecated: false,
            }),
        }
    }

    /// An object with exactly this block's attributes, taken from `fields`
    /// (Null for the ones it lacks): Terraform refuses an object with an
    /// attribute missing or extra.
    pub fn object(&self, mut fields: BTreeMap<String, Value>) -> Value {
        Value::Map(
            self.attrs
                .iter()
                .map(|a| {
                    (
                        a.name.to_string(),
                        fields.remove(a.name).unwrap_or(Value::Null),
                    )
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_are_written_in_terraforms_notation() {
        let t = Ty::List(Box::new(Ty::Object(vec![
            ("name", Ty::String),
            ("labels", Ty::Map(Box::new(Ty::String))),
        ])));
        assert_eq!(
            t.json().to_string(),
            r#"["list",["object",{"labels":["map","string"],"name":"string"}]]"#
        );
    }

    #[test]
    fn an_object_has_every_attribute_and_no_other() {
        let b = Block {
            description: "",
            attrs: vec![
                Attr::new("a", Ty::String, Mode::Required, ""),
                Attr::new("b", Ty::Number, Mode::Computed, ""),
            ],
        };
        let mut f = BTreeMap::new();
        f.insert("a".to_string(), Value::string("x"));
        f.insert("stray".to_string(), Value::Bool(true));
        let o = b.object(f);
        let Value::Map(m) = &o else { panic!() };
        assert_eq!(m.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(o.get("b"), &Value::Null);
    }
}
