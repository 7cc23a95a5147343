//! `/api/v1/products`: create, list, get and delete products.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::extract::{product_id, ApiJson, ApiQuery, ReadAccess, WriteAccess};
use super::page::{next_page, page_limit, PageQuery};
use super::SharedState;
use crate::error::{Error, Problem, Result};
use crate::ids::ProductId;
use crate::model::store::ProductRecord;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProduct {
    /// `[A-Za-z0-9_-]{1,64}`; becomes a topic level and the first half of device usernames.
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Product {
    pub id: String,
    pub name: String,
    pub description: String,
    /// Unix milliseconds.
    pub created_at: i64,
    pub device_count: i64,
    /// Devices with an open broker session (single-product reads only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub online_count: Option<i64>,
}

impl From<ProductRecord> for Product {
    fn from(p: ProductRecord) -> Self {
        Self {
            id: p.id.to_string(),
            name: p.name,
            description: p.description,
            created_at: p.created_at,
            device_count: p.device_count,
            online_count: None,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProductPage {
    pub items: Vec<Product>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DeleteQuery {
    /// Also delete (and disconnect) every device of the product.
    #[serde(default)]
    pub force: bool,
}

#[utoipa::path(post, path = "/api/v1/products", tag = "products", request_body = CreateProduct,
    responses((status = 201, body = Product), (status = 409, body = Problem), (status = 422, body = Problem)),
    security(("api_key" = ["write"])))]
pub async fn create(
    _: WriteAccess,
    State(state): State<SharedState>,
    ApiJson(req): ApiJson<CreateProduct>,
) -> Result<(StatusCode, Json<Product>)> {
    let id = ProductId::parse(req.id).map_err(|e| Error::validation("id", e))?;
    let name = req.name.unwrap_or_else(|| id.to_string());
    let product = state.registry.create_product(id, &name, req.description.as_deref().unwrap_or("")).await?;
    Ok((StatusCode::CREATED, Json(product.into())))
}

#[utoipa::path(get, path = "/api/v1/products", tag = "products", params(PageQuery),
    responses((status = 200, body = ProductPage)), security(("api_key" = ["read"])))]
pub async fn list(
    _: ReadAccess,
    State(state): State<SharedState>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<ProductPage>> {
    let limit = page_limit(q.limit)?;
    let after = q
        .cursor
        .map(|c| ProductId::parse(c).map_err(|_| Error::validation("cursor", "not a cursor from a previous page")))
        .transpose()?;
    // One extra row tells whether another page exists, so the last page never carries a cursor.
    let mut items = state.registry.list_products(after.as_ref(), limit + 1).await?;
    let next_cursor = next_page(&mut items, limit, |p| p.id.to_string());
    Ok(Json(ProductPage { items: items.into_iter().map(Product::from).collect(), next_cursor }))
}

#[utoipa::path(get, path = "/api/v1/products/{product_id}", tag = "products",
    params(("product_id" = String, Path)), responses((status = 200, body = Product), (status = 404, body = Problem)),
    security(("api_key" = ["read"])))]
pub async fn get(
    _: ReadAccess,
    State(state): State<SharedState>,
    Path(product): Path<String>,
) -> Result<Json<Product>> {
    let product = state.registry.get_product(&product_id(product)?).await?;
    let online_count = state.history.online_count(&product.id).await?;
    Ok(Json(Product { online_count: Some(online_count), ..product.into() }))
}

#[utoipa::path(delete, path = "/api/v1/products/{product_id}", tag = "products",
    params(("product_id" = String, Path), DeleteQuery),
    responses((status = 204), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("api_key" = ["write"])))]
pub async fn delete(
    _: WriteAccess,
    State(state): State<SharedState>,
    Path(product): Path<String>,
    ApiQuery(q): ApiQuery<DeleteQuery>,
) -> Result<StatusCode> {
    state.registry.delete_product(&product_id(product)?, q.force).await?;
    Ok(StatusCode::NO_CONTENT)
}
